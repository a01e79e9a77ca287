"""KIVI: asymmetric 2/4-bit quantisation of a KV cache (pure torch).

Method: Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization
for KV Cache" (ICML 2024). Keys have outlier *channels*, so they are
quantised per channel over groups of ``group_size`` consecutive tokens;
values have no channel structure, so they are quantised per token over groups
of ``group_size`` consecutive channels. Both are asymmetric (min/max):

    scale = (max - min) / (2**bits - 1),  zero = min
    code  = clamp(round((x - zero) / scale), 0, 2**bits - 1)
    x_hat = code * scale + zero

KIVI keeps the most recent R tokens in full precision (the "residual"
window) and quantises a whole key group when R fills up; that bookkeeping is
the caller's (``rarefy/passes/kv.py``); these functions only (de)quantise.
The Triton decode kernel in ``decode_attention.py`` reads the packed layouts
below directly; ``dequantize_*`` are its reference path.

Packing. Codes are packed LSB-first into uint8, P = 8 // bits codes per byte
(bits=4: low nibble first; bits=2: bits 0-1 hold the first code). For a cache
of shape [B, H_kv, T, Dh] (any leading dims work, written [..., T, Dh]):

keys (per-channel, groups along tokens) — packed along the TOKEN axis:
    codes  uint8 [..., T * bits // 8, Dh]; byte (r, d) holds tokens
           r*P .. r*P + P-1 of channel d (token r*P in the lowest bits).
    scale  [..., T // group_size, Dh]     zero  [..., T // group_size, Dh]
    Why: a decode tile of BLOCK_N tokens x Dh channels is BLOCK_N/P whole
    rows of Dh contiguous bytes, so every byte is loaded once and adjacent
    threads read adjacent channels; scales of a token group are a contiguous
    channel row, and writing one new group appends G/P contiguous rows.
    Requires T % group_size == 0 (KIVI only quantises whole groups).

values (per-token, groups along channels) — packed along the CHANNEL axis:
    codes  uint8 [..., T, Dh * bits // 8]; byte (t, c) holds channels
           c*P .. c*P + P-1 of token t.
    scale  [..., T, Dh // group_size]     zero  [..., T, Dh // group_size]
    Requires Dh % group_size == 0; a token can be appended on its own.

``group_size`` must be a multiple of P and, for the Triton kernel, a power
of two. Scales/zeros are stored in ``scale_dtype`` (default fp16, as in KIVI:
fp32 would double the overhead, e.g. 2-bit keys with G=32 cost 2 + 2*16/32
= 3 bits per element with fp16 but 4 with fp32). Codes are computed against
the *stored* (rounded) scale and zero, so storage rounding adds no error
beyond one code step. Inputs may be fp32/fp16/bf16; math is fp32.
"""

from __future__ import annotations

import torch

__all__ = [
    "SUPPORTED_BITS",
    "pack_codes",
    "unpack_codes",
    "quantize_keys",
    "dequantize_keys",
    "quantize_values",
    "dequantize_values",
]

SUPPORTED_BITS = (2, 4)


def _check_bits_group(bits: int, group_size: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"KIVI supports bits in {SUPPORTED_BITS}, got {bits}")
    per_byte = 8 // bits
    if group_size <= 0 or group_size % per_byte:
        raise ValueError(f"group_size={group_size} must be a positive multiple of {per_byte} (codes per byte at {bits} bits)")
    return per_byte


def pack_codes(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into uint8 along ``dim``, LSB-first."""
    per_byte = 8 // bits
    dim = dim % codes.dim()
    if codes.shape[dim] % per_byte:
        raise ValueError(f"size {codes.shape[dim]} of dim {dim} is not a multiple of {per_byte}")
    c = codes.to(torch.uint8).movedim(dim, -1)
    c = c.reshape(*c.shape[:-1], c.shape[-1] // per_byte, per_byte)
    packed = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
    for j in range(per_byte):
        packed |= c[..., j] << (j * bits)
    return packed.movedim(-1, dim).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 -> uint8 codes, ``dim`` grows by 8 // bits."""
    per_byte = 8 // bits
    dim = dim % packed.dim()
    p = packed.movedim(dim, -1)
    mask = (1 << bits) - 1
    codes = torch.stack([(p >> (j * bits)) & mask for j in range(per_byte)], dim=-1)
    codes = codes.reshape(*p.shape[:-1], p.shape[-1] * per_byte)
    return codes.movedim(-1, dim)


def _quantize_groups(x: torch.Tensor, bits: int, scale_dtype: torch.dtype):
    """Asymmetric min/max quantisation over the last dim of ``x`` [..., G]."""
    xf = x.float()
    mn = xf.amin(dim=-1)
    mx = xf.amax(dim=-1)
    qmax = (1 << bits) - 1
    scale = ((mx - mn) / qmax).to(scale_dtype)
    zero = mn.to(scale_dtype)
    s = scale.float()
    # A constant group has scale 0: every code is 0 and x_hat = zero exactly.
    s_safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round((xf - zero.float()[..., None]) / s_safe[..., None]).clamp_(0, qmax)
    return codes.to(torch.uint8), scale, zero


def quantize_keys(k: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16):
    """Per-channel KIVI key quantisation.

    k [..., T, Dh] with T % group_size == 0 ->
    (codes uint8 [..., T*bits//8, Dh], scale [..., T//G, Dh], zero [..., T//G, Dh]).
    """
    _check_bits_group(bits, group_size)
    *lead, t, dh = k.shape
    if t % group_size:
        raise ValueError(f"keys: T={t} must be a multiple of group_size={group_size} (keep the rest in the residual window)")
    # [..., T/G, G, Dh] -> groups on the last axis: [..., T/G, Dh, G]
    g = k.reshape(*lead, t // group_size, group_size, dh).transpose(-1, -2)
    codes, scale, zero = _quantize_groups(g, bits, scale_dtype)
    codes = codes.transpose(-1, -2).reshape(*lead, t, dh)
    return pack_codes(codes, bits, dim=-2), scale, zero


def dequantize_keys(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """codes uint8 [..., T*bits//8, Dh], scale/zero [..., T//G, Dh] -> keys [..., T, Dh] in ``dtype``."""
    _check_bits_group(bits, group_size)
    c = unpack_codes(codes, bits, dim=-2).float()
    s = scale.float().repeat_interleave(group_size, dim=-2)
    z = zero.float().repeat_interleave(group_size, dim=-2)
    if s.shape != c.shape:
        raise ValueError(f"keys: codes unpack to {tuple(c.shape)} but scales expand to {tuple(s.shape)}")
    return (c * s + z).to(dtype)


def quantize_values(v: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16):
    """Per-token KIVI value quantisation.

    v [..., T, Dh] with Dh % group_size == 0 ->
    (codes uint8 [..., T, Dh*bits//8], scale [..., T, Dh//G], zero [..., T, Dh//G]).
    """
    _check_bits_group(bits, group_size)
    *lead, t, dh = v.shape
    if dh % group_size:
        raise ValueError(f"values: Dh={dh} must be a multiple of group_size={group_size}")
    g = v.reshape(*lead, t, dh // group_size, group_size)
    codes, scale, zero = _quantize_groups(g, bits, scale_dtype)
    return pack_codes(codes.reshape(*lead, t, dh), bits, dim=-1), scale, zero


def dequantize_values(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """codes uint8 [..., T, Dh*bits//8], scale/zero [..., T, Dh//G] -> values [..., T, Dh] in ``dtype``."""
    _check_bits_group(bits, group_size)
    c = unpack_codes(codes, bits, dim=-1).float()
    s = scale.float().repeat_interleave(group_size, dim=-1)
    z = zero.float().repeat_interleave(group_size, dim=-1)
    if s.shape != c.shape:
        raise ValueError(f"values: codes unpack to {tuple(c.shape)} but scales expand to {tuple(s.shape)}")
    return (c * s + z).to(dtype)
