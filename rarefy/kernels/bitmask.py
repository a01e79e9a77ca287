"""Bitmask-compressed sparse weights: the kept values of ``W [N, K]`` plus a 1-bit mask.

Layout
------
mask    uint8 ``[N, ceil(K / 8)]``: bit ``k`` of row ``n`` (LSB-first bitstream, as
        ``pack_bits(m, 1)``) is 1 where ``W[n, k]`` is kept.
values  float ``[nnz]``: the kept entries in row-major order (``W[mask]``), where
        ``nnz`` is the number of set bits. A kept entry may itself be 0.

At 50% sparsity an fp32 weight costs ``0.5 * 4 + 1/8`` bytes per entry: 0.53x dense.
No kernel multiplies by this format directly: :func:`masked_linear_reference` expands
the weight to dense (the ONNX lowering does the same inside the graph), so the format
saves storage, not time. Pure torch; imports nothing from rarefy.
"""

from __future__ import annotations

import torch

from .matmul_nbits import pack_bits, unpack_bits


def compress_masked(dense: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [nnz], mask uint8 [N, ceil(K/8)])`` of ``dense [N, K]`` where ``keep`` is True."""
    if dense.dim() != 2 or keep.shape != dense.shape:
        raise ValueError(f"need a [N, K] weight and a mask of the same shape, got {tuple(dense.shape)} "
                         f"and {tuple(keep.shape)}")
    return dense[keep].contiguous(), pack_bits(keep.to(torch.int64), 1)


def decompress_masked(values: torch.Tensor, mask: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Dense ``[N, K]`` from :func:`compress_masked`'s output."""
    keep = unpack_bits(mask, 1, K).bool()
    if tuple(keep.shape) != (N, K):
        raise ValueError(f"mask unpacks to {tuple(keep.shape)}, expected {(N, K)}")
    if int(keep.sum()) != values.numel():
        raise ValueError(f"mask keeps {int(keep.sum())} entries but {values.numel()} values are stored")
    dense = torch.zeros((N, K), dtype=values.dtype, device=values.device)
    dense[keep] = values
    return dense


def masked_linear_reference(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, bias, N: int, K: int):
    """``x @ W.T + bias`` with ``W`` rebuilt from values and mask; fp32 accumulation, x.dtype out."""
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} input features, expected K={K}")
    w = decompress_masked(values.float(), mask, N, K)
    y = x.reshape(-1, K).float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)
