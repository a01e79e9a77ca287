"""Token pruning as a graph rewrite: ``PruneTokens`` (``MergeTokens`` is in ``tokens_merge.py``).

Encoders (BERT-like, ViT) — Zero-TPrune (Wang et al., 2024) / EViT (Liang et al., ICLR 2022):
after block ``after_layer`` (1-based: the first ``after_layer`` blocks run on every token),
tokens are ranked by the attention they receive in that block — mean over heads and real
queries (``score="attention"``: one step of Zero-TPrune's weighted PageRank, from uniform query
weights; the paper iterates it) or from the [CLS] query (``score="cls"``, EViT) —
the top ``keep`` fraction is kept — padding never outranks a real token, the first ([CLS])
token is always kept — and the remaining blocks run on the kept hidden states and the kept
rows/columns of their attention mask.

``lookahead=True`` ranks by the attention of the first shortened block instead (block
``after_layer + 1``): its q/k (and mask) are computed once more on every token, before the
pruning, so tokens are kept for the attention that will actually read them; the cost is that
block's q/k projections once more, on every token. On all-MiniLM-L6-v2 at keep 0.5 after layer 2 it
raises the embedding cosine from 0.905 to 0.931 (attention scores) and from 0.937 to 0.945
([CLS] scores) for ~3% of the run (benchmarks/results/tokens.md).

``fuse=True`` adds EViT's inattentive-token fusion: the pruned real tokens become ONE extra
token, their attention-weighted average, carried through the remaining blocks with its size
(how many tokens it stands for) as in ``MergeTokens``: proportional attention (``+ log size``
on its key) and, at the output, every pruned position reads its final state, so mean pooling
over the original mask is the size-weighted mean. Default off: on all-MiniLM-L6-v2
(mean-pooled embeddings) it measured below the plain fill (0.887 vs 0.905 cosine at keep 0.5
after layer 2): one fused state stands in for half the tokens of the mean.

Decoder prefill — FastV (Chen et al., 2024): after layer ``after_layer`` the prompt tokens the
*last* token attends to most are kept, the last token always; the rotary tables (cos/sin,
computed from the position ids) are gathered with the tokens, so kept tokens keep their
original positions, and the kept indices stay in order so the causal mask still holds.

Scores come from attention probabilities recomputed from the scoring block's q and k
(``softmax(q k^T * scale + mask)``, ``rarefy::token_scores``), so this works on any capture:
fused SDPA attention (the default of Hugging Face models) included; with eager attention
(``attn_implementation="eager"``) the graph's own softmax output is read instead. The kept count is
``ceil(keep * S)`` of the runtime sequence length S (padding included, ranked last), so
dynamic shapes survive.

What a caller gets for per-token outputs:
* encoders: the full ``[B, S, D]`` shape; kept tokens at their original positions with their
  final states, pruned positions filled with the mean of the row's kept real tokens, so that
  mean pooling over the original attention mask equals the mean over the kept tokens and
  [CLS] pooling is untouched (``rarefy::scatter_tokens``); with ``fuse``, the fused token's
  final state (``rarefy::scatter_fused``);
* decoders: logits for the kept positions only, ``[B, ceil(keep * S), V]``, in order; the last
  position is the last prompt token, whose logits are what next-token prediction uses.

New ops: ``rarefy::token_scores``, ``rarefy::select_tokens``, ``rarefy::gather_tokens`` (Triton
kernel ``rarefy.kernels.token_gather``), ``rarefy::gather_mask``, ``rarefy::scatter_tokens``;
with ``fuse``: ``rarefy::fuse_pruned``, ``rarefy::fused_mask``, ``rarefy::scatter_fused``.
Dialect: FX. Dtypes: fp32 / fp16 hidden states.
"""
from __future__ import annotations

import operator
from fractions import Fraction

import torch

from ..ir.errors import ArgumentError, PassError, UnsupportedError
from . import args
from .base import Pass, PassResult

aten = torch.ops.aten
_SCORED = {(True, "attention"): "last query, FastV", (False, "cls"): "[CLS] query, mean over heads, EViT",
           (False, "attention"): "mean over heads and real queries, Zero-TPrune"}
_SHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


def is_decoder(graph) -> bool:
    """A causal LM capture (prefill): decides FastV-style scoring and kept-only logits."""
    config = graph.meta.get("config") or {}
    source = str(graph.meta.get("source", ""))
    return bool(config.get("is_decoder")) or "CausalLM" in source or "LMHead" in source \
        or any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])


def token_blocks(graph, who: str) -> list:
    """The graph's blocks that have an attention part; clear errors when there are none."""
    blocks = graph.sites("block")
    attention = {a.info["block"] for a in graph.sites("attention")}
    if not blocks or not attention:
        raise UnsupportedError(f"{who}: the graph has no attention sites (no transformer blocks found), "
                               "so there are no tokens to prune or merge")
    return [b for b in blocks if b.name in attention]


def attention_call(block) -> dict:
    """q, k, mask, scale and causality of the block's attention: fused SDPA, or eager probabilities (k None)."""
    for node in block.nodes:
        if node.op == "call_function" and node.target is aten.scaled_dot_product_attention.default:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
            call = dict(zip(names, node.args))
            call.update(node.kwargs)
            q = call["query"]
            scale = call.get("scale") or q.meta["val"].shape[-1] ** -0.5
            return {"node": node, "q": q, "k": call["key"], "mask": call.get("attn_mask"),
                    "scale": float(scale), "is_causal": bool(call.get("is_causal", False))}
    for node in block.nodes:  # eager attention: the probabilities are in the graph already
        if node.op == "call_function" and node.target in (aten.softmax.int, aten._softmax.default):
            logits = node.args[0]
            mask = None
            if isinstance(logits, torch.fx.Node) and logits.target is aten.add.Tensor:
                mask = next((a for a in logits.args if isinstance(a, torch.fx.Node) and a.op != "get_attr"
                             and a.meta["val"].dim() == 4 and a.meta["val"].shape[1] == 1), None)
            return {"node": node, "q": node, "k": None, "mask": mask, "scale": 1.0, "is_causal": False}
    raise UnsupportedError(f"block {block.name} has neither aten.scaled_dot_product_attention nor a softmax: "
                           "no attention scores to rank tokens by")


def _same(value, seq) -> bool:
    if isinstance(value, torch.SymInt) and isinstance(seq, torch.SymInt):
        return value.node.expr == seq.node.expr
    return not isinstance(value, torch.SymInt) and not isinstance(seq, torch.SymInt) and value == seq


def _mentions(value, seq) -> bool:
    if isinstance(value, torch.SymInt) and isinstance(seq, torch.SymInt):
        return bool(value.node.expr.free_symbols & seq.node.expr.free_symbols)
    return _same(value, seq)


class TokenRegion:
    """The blocks that run on fewer tokens, and the outside values they read that have a token axis.

    Roles of those values: ``hidden`` (the residual stream entering the first shortened block),
    ``seq`` (the symbolic sequence length), ``mask`` (4-D attention masks) and ``rows``
    (per-token tables such as rotary cos/sin, [B|1, S, *]). A static sequence length written as
    a literal in view/reshape/expand shapes (ViT) is replaced by a length node too.
    """

    def __init__(self, gm: torch.fx.GraphModule, blocks: list, extra_nodes: list = ()):
        self.gm = gm
        self.nodes = [n for b in blocks for n in b.nodes] + list(extra_nodes)
        self.node_set = set(self.nodes)
        self.hidden = blocks[0].info["hidden_input"]
        if self.hidden is None:
            raise UnsupportedError(f"block {blocks[0].name}: no hidden-state input found")
        self.seq = self.hidden.meta["val"].shape[1]
        self.roles: dict[str, list] = {"seq": [], "mask": [], "rows": []}
        for node in self.nodes:
            for arg in node.all_input_nodes:
                if arg in self.node_set or arg is self.hidden or arg.op == "get_attr":
                    continue
                role = self._role(arg)
                if role and arg not in self.roles[role]:
                    self.roles[role].append(arg)

    def _role(self, node):
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):
            if _same(val, self.seq):
                return "seq"
            if _mentions(val, self.seq):
                raise UnsupportedError(f"{node.name} = {val} depends on the sequence length in a way the "
                                       "token rewrite cannot follow")
            return None
        if not isinstance(val, torch.Tensor) or val.dim() < 2 or not any(_mentions(d, self.seq) for d in val.shape[1:]):
            return None
        if val.dim() == 4 and _same(val.shape[-1], self.seq):
            return "mask"
        if val.dim() == 3 and _same(val.shape[1], self.seq):
            return "rows"
        raise UnsupportedError(f"{node.name} {tuple(val.shape)} feeds the shortened blocks and has a token "
                               "axis the token rewrite does not know how to gather")

    def first_node(self) -> torch.fx.Node:
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        return min(self.nodes, key=order.__getitem__)

    def reroute(self, old, new) -> None:
        for node in self.nodes:
            if old in node.all_input_nodes:
                node.replace_input_with(old, new)

    def replace_static_length(self, length: torch.fx.Node) -> int:
        """Literal sequence lengths in shape arguments -> ``length``; returns how many."""
        if isinstance(self.seq, torch.SymInt):
            return 0
        count = 0
        for node in self.nodes:
            if node.op == "call_function" and node.target in _SHAPE_OPS and isinstance(node.args[1], (list, tuple)):
                shape = list(node.args[1])
                hits = [i for i, d in enumerate(shape) if isinstance(d, int) and d == self.seq and i >= 1]
                for i in hits:
                    shape[i] = length
                if hits:
                    node.args = (node.args[0], shape, *node.args[2:])
                    count += len(hits)
        return count

    def outside_users(self, node: torch.fx.Node) -> list:
        return [u for u in node.users if u not in self.node_set]


def call(graph: torch.fx.Graph, target, *args):
    return graph.call_function(target, tuple(args))


def _on_every_token(g: torch.fx.Graph, attention: dict, block) -> dict:
    """``attention`` with its q, k and mask recomputed on every token: copies (at the graph's
    insertion point) of the nodes of ``block`` they depend on, reading the unpruned values."""
    inside, order, seen = set(block.nodes), [], set()

    def visit(node) -> None:
        if not isinstance(node, torch.fx.Node) or node in seen or node not in inside:
            return
        seen.add(node)
        for arg in node.all_input_nodes:
            visit(arg)
        order.append(node)  # after its inputs: a topological order

    for key in ("q", "k", "mask"):
        visit(attention[key])
    copies: dict = {}
    for node in order:
        copies[node] = g.node_copy(node, lambda arg: copies.get(arg, arg))
    return {**attention, **{key: copies.get(attention[key], attention[key]) for key in ("q", "k", "mask")}}


def nodes_after(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list:
    """Every call_function node after ``node`` in graph order (the model's head after its blocks)."""
    out, seen = [], False
    for n in gm.graph.nodes:
        if seen and n.op == "call_function":
            out.append(n)
        seen = seen or n is node
    return out


class PruneTokens(Pass):
    """Keep the tokens that receive the most attention after one block (Zero-TPrune, EViT, FastV)."""

    def __init__(self, keep: float, after_layer: int, score: str = "attention", fuse: bool = False,
                 lookahead: bool = False, *, targets=None, ignore=None, budget=None):
        super().__init__(targets=targets, ignore=ignore, budget=budget)
        args.flag(self.name, "fuse", fuse)
        args.flag(self.name, "lookahead", lookahead)
        keep = args.number(self.name, "keep", keep, low=0, high=1, low_open=True)
        after_layer = args.integer(self.name, "after_layer", after_layer, low=1)  # blocks before run on every token
        if score not in ("attention", "cls"):
            raise ArgumentError(f"PruneTokens: score must be 'attention' (mean over real queries, Zero-TPrune) or 'cls' "
                            f"(attention from [CLS], EViT), got {score!r}")
        self.keep, self.after_layer, self.score, self.fuse = float(keep), after_layer, score, fuse
        self.lookahead = lookahead
        fraction = Fraction(self.keep).limit_denominator(1000)
        self.num, self.den = fraction.numerator, fraction.denominator

    def check(self, graph, ctx) -> None:
        super().check(graph, ctx)  # run by rf.optimize for every pass before any pass works
        self.requires(graph, ctx)

    def requires(self, graph, ctx) -> None:
        blocks = token_blocks(graph, self.name)
        if self.score == "cls" and is_decoder(graph):
            raise PassError("PruneTokens: score='cls' ranks by the attention of the first ([CLS]) token, which "
                            "decoders lack; decoder prefill ranks by the last token (score='attention', FastV)")
        if self.after_layer >= len(blocks):
            raise PassError(f"after_layer={self.after_layer} is beyond the depth: the graph has {len(blocks)} "
                            f"blocks, so after_layer must be 1..{len(blocks) - 1} (at least one block must "
                            "run on the kept tokens)")

    def call(self, graph, ctx) -> PassResult:
        blocks = token_blocks(graph, self.name)
        scorer, shortened = blocks[self.after_layer - 1], blocks[self.after_layer:]
        chosen, skipped = self.select([scorer.name])
        if not chosen:
            return PassResult(graph, False, {"skipped_scoring_block": 1},
                              [f"{scorer.name}: {skipped[scorer.name]}; no tokens pruned"])
        gm, decoder = graph.fx, is_decoder(graph)
        if self.lookahead:
            scorer = shortened[0]
        attention = attention_call(scorer)
        head = nodes_after(gm, shortened[-1].info["outputs"][-1]) if decoder else []
        region = TokenRegion(gm, shortened, [n for n in head if n not in set(shortened[-1].nodes)])
        fuse, why_not = self._fusion(decoder, region)
        g, size = gm.graph, None
        with g.inserting_before(region.first_node()):
            if self.lookahead:
                attention = _on_every_token(g, attention, scorer)
            scored = call(g, torch.ops.rarefy.token_scores.default, attention["q"], attention["k"],
                          attention["mask"], attention["scale"], attention["is_causal"], decoder,
                          self.score == "cls")
            scores, valid = call(g, operator.getitem, scored, 0), call(g, operator.getitem, scored, 1)
            index = call(g, torch.ops.rarefy.select_tokens.default, scores, valid, self.num, self.den,
                         not decoder, decoder)
            hidden = call(g, torch.ops.rarefy.gather_tokens.default, region.hidden, index)
            if fuse:  # EViT: one extra token, the attention-weighted average of the pruned ones, of size n
                fused = call(g, torch.ops.rarefy.fuse_pruned.default, region.hidden, index, scores, valid, True)
                size = call(g, operator.getitem, fused, 1)
                hidden = call(g, aten.cat.default, [hidden, call(g, operator.getitem, fused, 0)], 1)
            length = call(g, aten.sym_size.int, hidden, 1)
            batch = call(g, aten.sym_size.int, region.hidden, 0)
            region.reroute(region.hidden, hidden)
            for node in region.roles["seq"]:
                region.reroute(node, length)
            for node in region.roles["mask"]:
                region.reroute(node, call(g, torch.ops.rarefy.fused_mask.default, node, index, size) if fuse
                               else call(g, torch.ops.rarefy.gather_mask.default, node, index))
            masks_added = self._add_size_masks(region, index, size) if fuse and not region.roles["mask"] else 0
            for node in region.roles["rows"]:  # rotary tables: tokens keep their original positions
                rows = call(g, aten.expand.default, node, [batch, -1, -1])
                region.reroute(node, call(g, torch.ops.rarefy.gather_tokens.default, rows, index))
        literals = region.replace_static_length(length)
        restored = 0
        if not decoder:
            restore = torch.ops.rarefy.scatter_fused.default if fuse else torch.ops.rarefy.scatter_tokens.default
            for out in shortened[-1].info["outputs"]:
                users = region.outside_users(out)
                with g.inserting_after(out):
                    full = call(g, restore, out, index, valid)
                for user in users:
                    user.replace_input_with(out, full)
                restored += 1
        stats = {"blocks_on_kept_tokens": len(shortened), "masks_gathered": len(region.roles["mask"]),
                 "rotary_tables_gathered": len(region.roles["rows"]), "outputs_restored": restored,
                 "static_lengths_replaced": literals, "fused_tokens": int(fuse), "size_masks_added": masks_added}
        notes = [f"scores: attention received in {scorer.name}, recomputed from the q/k of "
                 f"{attention['node'].name} ({_SCORED[(decoder, self.score)]})"
                 + (" on every token, before the pruning (lookahead)" if self.lookahead else ""),
                 f"kept per row: ceil({self.keep} * S) tokens; "
                 + ("the last token always kept, logits for kept positions only" if decoder else
                    "[CLS] always kept, padding ranked last, outputs restored to full length"),
                 "pruned tokens fused into one token of their count's size (EViT; proportional attention, "
                 "pruned positions read its final state)" if fuse else f"no fused token: {why_not}"]
        details = {"mode": "decoder" if decoder else "encoder", "scoring_block": scorer.name,
                   "shortened_blocks": [b.name for b in shortened], "keep": self.keep, "fuse": fuse}
        return PassResult(graph, True, stats, notes, details)

    def _fusion(self, decoder: bool, region: TokenRegion) -> tuple[bool, str]:
        """Whether to fuse the pruned tokens, and the reason when not."""
        if not self.fuse:
            return False, "fuse=False"
        if decoder:
            return False, "decoder prefill (FastV): a fused token has no position for causal attention"
        if region.roles["rows"]:
            return False, f"{region.roles['rows'][0].name} is a per-token table (rotary?) a fused token has no row of"
        if self.keep == 1.0:
            return False, "keep=1.0 prunes nothing"
        return True, ""

    @staticmethod
    def _add_size_masks(region: TokenRegion, index, size) -> int:
        """Unmasked SDPA calls (ViT) get the fused token's log-size mask; returns how many."""
        g, mask, count = region.gm.graph, None, 0
        for node in region.nodes:
            if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
                continue
            if (node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")) is None:
                if mask is None:
                    mask = call(g, torch.ops.rarefy.fused_mask.default, None, index, size)
                if len(node.args) > 3:
                    node.update_arg(3, mask)
                else:
                    node.update_kwarg("attn_mask", mask)
                count += 1
        return count
