"""Gather the kept tokens of a sequence (token pruning).

Token-pruning methods (e.g. attention-score pruning, ToMe-style keep
sets) decide per example which positions survive; this kernel moves them:

    out[b, j, :] = hidden[b, index[b, j], :]

Shapes: hidden [B, S, D] (any float/int dtype, any strides), index
[B, S_keep] int64 or int32, out [B, S_keep, D] contiguous, hidden's dtype.
Indices must lie in [0, S); a row whose index is out of range is written as
zeros by both the kernel and the reference (the kernel never reads out of
bounds; a host-side range check would cost a device sync per call).

Layout: one program copies a [BLOCK_T, BLOCK_D] tile: BLOCK_T kept tokens
(one index load each) by BLOCK_D channels, channels on the fastest axis so a
warp reads and writes contiguous bytes of each row (coalesced along D).
"""

from __future__ import annotations

import os

import torch

from ._triton import tl, triton  # stand-ins when triton, an optional extra, is absent

__all__ = ["gather_tokens", "gather_tokens_reference"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if _INTERPRET:
    # The interpreter pays per program instance: one config, big tiles.
    _CONFIGS = [triton.Config({"BLOCK_T": 32, "BLOCK_D": 256})]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w)
        for bt, bd, w in [(1, 1024, 4), (4, 256, 4), (4, 512, 4), (8, 256, 8), (8, 512, 8), (16, 128, 4), (16, 256, 8)]
    ]


@triton.autotune(configs=_CONFIGS, key=["D", "ELEM_BYTES"])
@triton.jit
def _gather_tokens_kernel(
    # pointers
    hidden_ptr,
    index_ptr,
    out_ptr,
    # sizes
    S,
    S_keep,
    D,
    # strides (elements)
    stride_hb,
    stride_hs,
    stride_hd,
    stride_ib,
    stride_is,
    stride_ob,
    stride_os,
    # meta-parameters
    ELEM_BYTES: tl.constexpr,  # autotune key only: the best tile depends on row bytes
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = offs_t < S_keep
    d_ok = offs_d < D

    # One index per kept token; out-of-range rows are masked, never read.
    src = tl.load(index_ptr + b * stride_ib + offs_t * stride_is, mask=t_ok, other=0).to(tl.int64)
    src_ok = t_ok & (src >= 0) & (src < S)

    # Copy the tile: channels are the contiguous axis of both rows.
    mask = src_ok[:, None] & d_ok[None, :]
    x = tl.load(
        hidden_ptr + b * stride_hb + src[:, None] * stride_hs + offs_d[None, :] * stride_hd,
        mask=mask,
        other=0,
    )
    tl.store(
        out_ptr + b * stride_ob + offs_t[:, None].to(tl.int64) * stride_os + offs_d[None, :],
        x,
        mask=t_ok[:, None] & d_ok[None, :],
    )


def gather_tokens(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, D], index int [B, S_keep] -> [B, S_keep, D] (Triton)."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, S, D], got shape {tuple(hidden.shape)}")
    if index.dim() != 2 or index.shape[0] != hidden.shape[0]:
        raise ValueError(f"index must be [B, S_keep] with B={hidden.shape[0]}, got shape {tuple(index.shape)}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"index must be int64 or int32, got {index.dtype}")
    if index.device != hidden.device:
        raise ValueError(f"hidden on {hidden.device} but index on {index.device}")
    if hidden.dtype == torch.bool:
        raise TypeError("bool hidden states are not supported; cast to uint8")

    B, S, D = hidden.shape
    S_keep = index.shape[1]
    out = torch.empty((B, S_keep, D), dtype=hidden.dtype, device=hidden.device)
    if out.numel() == 0:
        return out

    def grid(meta):
        return (triton.cdiv(S_keep, meta["BLOCK_T"]), triton.cdiv(D, meta["BLOCK_D"]), B)

    _gather_tokens_kernel[grid](
        hidden,
        index,
        out,
        S,
        S_keep,
        D,
        *hidden.stride(),
        *index.stride(),
        out.stride(0),
        out.stride(1),
        ELEM_BYTES=hidden.element_size(),
    )
    return out


def gather_tokens_reference(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pure-torch oracle and CPU fallback of :func:`gather_tokens` (same out-of-range rule)."""
    B, S, D = hidden.shape
    index = index.long()
    valid = (index >= 0) & (index < S)
    safe = torch.where(valid, index, torch.zeros_like(index))
    out = torch.gather(hidden, 1, safe[:, :, None].expand(-1, -1, D))
    return torch.where(valid[:, :, None], out, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
