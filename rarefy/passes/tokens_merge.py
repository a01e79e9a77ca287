"""Token merging as a graph rewrite: ``MergeTokens`` — ToMe (Bolya et al., ICLR 2023).

Bipartite soft matching: the tokens of a row alternate between sets A and B; each A token
finds its most similar B token by the cosine of their attention keys (mean over heads); the
``r`` most similar pairs merge into one token, the size-weighted average of the two, whose
size (how many input tokens it stands for) is carried on. Later blocks attend with
proportional attention, ``softmax(q k^T / sqrt(d) + log(size))``, so a merged token counts
once per token it absorbed. The first ([CLS]) token is never merged; padding merges only
with padding (and first), so real tokens never absorb it.

Where: ToMe merges inside each block, between attention and MLP. Here the merge sits at the
block boundary — after block ``i`` (its keys as the metric), before block ``i + 1`` — for
every block from ``first_layer`` on (1-based, like ``PruneTokens.after_layer``), so each
merge is one rewrite of the residual stream and the shortened blocks are unchanged code;
the MLP of the merging block still runs on the unmerged tokens.

Per-token outputs keep the full ``[B, S, D]`` shape: each original position receives the
state of the merged token that holds it (ToMe's "unmerge"), so mean pooling over the
original mask is the size-weighted mean of the merged tokens and [CLS] pooling is intact.
Encoders and ViT only (a merged token has no single position for causal attention).
``r`` is per merge and must leave tokens: ``r <= (S - 1) // 2`` for the shortest sequence.
Ops: ``rarefy::merge_tokens`` (+ ``rarefy::gather_tokens`` for the unmerge). Dialect: FX.
"""
from __future__ import annotations

import operator

import torch

from ..ir.errors import PassError, UnsupportedError
from . import args
from .base import Pass, PassResult
from .tokens import TokenRegion, attention_call, call, is_decoder, token_blocks

aten = torch.ops.aten


class MergeTokens(Pass):
    """Merge ``r`` tokens per block by key similarity (ToMe bipartite soft matching)."""

    def __init__(self, r: int, first_layer: int = 1, *, targets=None, ignore=None, budget=None):
        super().__init__(targets=targets, ignore=ignore, budget=budget)
        self.r = args.integer(self.name, "r", r, low=0)  # tokens merged per block
        self.first_layer = args.integer(self.name, "first_layer", first_layer, low=1)

    def check(self, graph, ctx) -> None:
        super().check(graph, ctx)  # run by rf.optimize for every pass before any pass works
        self.requires(graph, ctx)

    def requires(self, graph, ctx) -> None:
        blocks = token_blocks(graph, self.name)
        if is_decoder(graph):
            raise UnsupportedError("token merging is for encoders and ViT; a merged token has no single position "
                                   "for causal attention (use PruneTokens for decoder prefill)")
        if self.first_layer >= len(blocks):
            raise PassError(f"first_layer={self.first_layer} is beyond the depth: the graph has {len(blocks)} "
                            f"blocks, so first_layer must be 1..{len(blocks) - 1}")
        seq = blocks[0].info["hidden_input"].meta["val"].shape[1]
        merges = len(blocks) - self.first_layer
        if isinstance(seq, int) and seq - merges * self.r < 1 + merges:
            raise PassError(f"r={self.r} over {merges} merges leaves no tokens of the {seq}-token sequence")

    def call(self, graph, ctx) -> PassResult:
        blocks = token_blocks(graph, self.name)
        if self.r == 0:
            return PassResult(graph, False, {"merges": 0}, ["r=0: nothing to merge"])
        gm, g = graph.fx, graph.fx.graph
        region = TokenRegion(gm, blocks[self.first_layer:])
        names = [b.name for b in blocks[self.first_layer - 1:-1]]
        chosen, skipped = self.select(names)
        notes = [f"{name}: {reason}; no merge after it" for name, reason in skipped.items()]
        literals = 0
        size = valid = slot = None
        mask = region.roles["mask"][0] if region.roles["mask"] else None
        if region.roles["rows"]:
            raise UnsupportedError(f"{region.roles['rows'][0].name} is a per-token table (rotary?) that merged "
                                   "tokens cannot share")
        current = {"seq": list(region.roles["seq"]), "mask": list(region.roles["mask"])}
        merges = 0
        for i, block in enumerate(blocks[self.first_layer - 1:-1], start=self.first_layer):
            if block.name not in chosen:
                continue
            later = TokenRegion(gm, blocks[i:])  # values created by earlier merges have no role: `current` has them
            hidden_in = later.hidden
            keys = attention_call(block)["k"]
            if keys is None:
                raise UnsupportedError(f"{block.name}: eager attention exposes no key tensor to match tokens by; "
                                       "capture with attn_implementation='sdpa'")
            with g.inserting_before(later.first_node()):
                merged = call(g, torch.ops.rarefy.merge_tokens.default, hidden_in, keys, size,
                              valid, slot, mask, self.r, True)
                hidden, size, valid, slot, new_mask = (call(g, operator.getitem, merged, j) for j in range(5))
                length = call(g, aten.sym_size.int, hidden, 1)
            later.reroute(hidden_in, hidden)
            for old in current["seq"]:
                later.reroute(old, length)
            for old in current["mask"]:
                later.reroute(old, new_mask)
            if merges == 0:
                literals = later.replace_static_length(length)
            current = {"seq": [length], "mask": [new_mask]}
            mask = new_mask
            merges += 1
        if merges == 0:
            return PassResult(graph, False, {"merges": 0}, notes)
        for out in blocks[-1].info["outputs"]:  # unmerge: every original position reads its merged token
            users = [u for u in out.users if u not in region.node_set]
            with g.inserting_after(out):
                full = call(g, torch.ops.rarefy.gather_tokens.default, out, slot)
            for user in users:
                user.replace_input_with(out, full)
        stats = {"merges": merges, "tokens_merged_per_row": merges * self.r, "static_lengths_replaced": literals}
        notes.append(f"r={self.r} tokens merged after each of {merges} blocks by key cosine; proportional attention "
                     "(log size) in the blocks after; outputs unmerged to full length")
        return PassResult(graph, True, stats, notes, {"merged_after": chosen, "r": self.r})
