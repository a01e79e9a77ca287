"""rarefy passes, one module per family. Every pass class is importable from here."""
from .base import Pass, PassResult, pass_class, registered_passes, select
from .cleanup import EliminateDeadCode
from .quantize import QuantizeWeights
from . import awq, gptq  # noqa: F401,E402  register QuantizeWeights(method="awq" / "gptq")
from .mixed_precision import MixedPrecision  # noqa: E402

__all__ = ["Pass", "PassResult", "pass_class", "registered_passes", "select", "EliminateDeadCode", "QuantizeWeights",
           "MixedPrecision"]
from .layers import DropLayers  # noqa: E402
from .sparsity import Sparsify  # noqa: E402
from .tokens import PruneTokens  # noqa: E402
from .tokens_merge import MergeTokens  # noqa: E402
from .prune import PruneChannels, PruneHeads  # noqa: E402
from .kv import CompressKV  # noqa: E402
from .smoothquant import SmoothQuant  # noqa: E402
from .outliers import SplitOutliers  # noqa: E402
from .quantize_activations import QuantizeActivations  # noqa: E402
