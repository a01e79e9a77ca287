"""Single-token decode attention over a KIVI-packed KV cache (flash-decoding).

Method: KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache"): the first T_q cached tokens are stored as
2/4-bit codes (keys per channel, values per token; layouts in ``kivi.py``),
the last R tokens (the residual window) in full precision. Split-K decoding
follows flash-decoding (Dao et al. 2023): each program scans a chunk of
tokens with an online softmax and writes a partial (max, sum, acc); a second
kernel merges the partials.

Shapes (H_q = H_kv * n_rep, grouped-query heads; q head h reads kv head
h // n_rep, as in HF ``repeat_kv``):
    q          [B, H_q, Dh]
    bits 2/4:  k_codes uint8 [B, H_kv, T_q*bits/8, Dh]  k_scale/k_zero [B, H_kv, T_q/G, Dh]
               v_codes uint8 [B, H_kv, T_q, Dh*bits/8]  v_scale/v_zero [B, H_kv, T_q, Dh/G]
    bits None/16: k_codes, v_codes are the plain cache [B, H_kv, T_q, Dh];
               the scale/zero arguments are None and group_size is ignored.
    k_recent, v_recent [B, H_kv, R, Dh] (or None for R = 0)
    lengths [B] int: valid quantised tokens (a prefix of T_q; static capacity)
    recent_lengths [B] int: valid recent tokens (a prefix of R)
    mask [B, T_q + R] bool, True = attend (combined with the lengths)
    out  [B, H_q, Dh] in q's dtype.
A query with no valid position returns zeros (not NaN). Invalid positions
are never read, so an uninitialised static cache is safe.

Kernel layout: program (b, kv head, split) loads the n_rep query heads of
the kv head once ([BLOCK_H >= 16, Dh], so both products run on ``tl.dot``)
and streams [BLOCK_N, Dh] tiles: keys as BLOCK_N/P contiguous byte rows,
values as BLOCK_N rows of Dh/P bytes, unpacked and dequantised in registers
(the dense cache is never materialised); scales of a key tile are one row
per token group, broadcast across the group. Softmax in fp32 with exp2;
products in q's dtype (fp32 products use IEEE, not TF32), accumulation fp32.
"""

from __future__ import annotations

import math
import os

import torch

from ._triton import tl, triton  # stand-ins when triton, an optional extra, is absent

from .kivi import dequantize_keys, dequantize_values

__all__ = ["decode_attention", "decode_attention_reference"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SPLIT_ALIGN = 128  # split chunks are multiples of every BLOCK_N below
_MAX_SPLITS = 64

if _INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_N": 64})]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
        for n, w, s in [(32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 8, 3)]
    ]


@triton.autotune(configs=_CONFIGS, key=["D", "N_REP", "BITS", "GROUP", "HAS_LEN", "HAS_MASK"])
@triton.jit
def _decode_partial_kernel(
    # pointers: query, key codes/scales/zeros, value codes/scales/zeros, validity, partial outputs
    q_ptr, k_ptr, ks_ptr, kz_ptr, v_ptr, vs_ptr, vz_ptr, len_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr,
    # sizes: tokens in this segment, head dim, kv heads, tokens per split, first partial slot, partial slots
    T, D, H_kv, chunk, split_offset, S_total,
    # strides (elements; the last dim of every tensor is contiguous)
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_ksb, stride_ksh, stride_kst,
    stride_vb, stride_vh, stride_vt,
    stride_vsb, stride_vsh, stride_vst,
    stride_mb, stride_mt,
    # softmax scale times log2(e)
    qk_scale,
    # meta-parameters
    BITS: tl.constexpr,  # 0 = plain cache, 2 or 4 = KIVI codes
    GROUP: tl.constexpr,
    N_REP: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // H_kv
    h = pid_bh % H_kv
    start = pid_s * chunk
    end = tl.minimum(start + chunk, T)
    if HAS_LEN:
        end = tl.minimum(end, tl.load(len_ptr + b).to(tl.int32))

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < N_REP
    d_ok = offs_d < D

    # The n_rep query heads sharing this kv head, pre-scaled so softmax can use exp2.
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + (h * N_REP + offs_h)[:, None] * stride_qh + offs_d[None, :],
        mask=h_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    q = (q.to(tl.float32) * qk_scale).to(DOT_DTYPE)

    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    ks_base = ks_ptr + b.to(tl.int64) * stride_ksb + h.to(tl.int64) * stride_ksh
    kz_base = kz_ptr + b.to(tl.int64) * stride_ksb + h.to(tl.int64) * stride_ksh
    vs_base = vs_ptr + b.to(tl.int64) * stride_vsb + h.to(tl.int64) * stride_vsh
    vz_base = vz_ptr + b.to(tl.int64) * stride_vsb + h.to(tl.int64) * stride_vsh

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)

    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        if HAS_MASK:
            keep = tl.load(mask_ptr + b.to(tl.int64) * stride_mb + offs_n * stride_mt, mask=n_ok, other=0)
            n_ok = n_ok & (keep != 0)
        nd_ok = n_ok[:, None] & d_ok[None, :]

        # Keys [BLOCK_N, BLOCK_D] in fp32, dequantised in registers.
        if BITS == 0:
            k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=nd_ok, other=0.0).to(tl.float32)
        else:
            P: tl.constexpr = 8 // BITS
            shifts = tl.arange(0, P) * BITS
            # BLOCK_N/P whole byte rows; byte (r, d) holds tokens r*P .. r*P+P-1.
            offs_r = n0 // P + tl.arange(0, BLOCK_N // P)
            kb = tl.load(
                k_base + offs_r[:, None] * stride_kt + offs_d[None, :],
                mask=(offs_r < T // P)[:, None] & d_ok[None, :],
                other=0,
            ).to(tl.int32)
            codes = (kb[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
            codes = tl.reshape(codes, (BLOCK_N, BLOCK_D)).to(tl.float32)
            if BLOCK_N <= GROUP:
                # Tiles are BLOCK_N-aligned and BLOCK_N divides GROUP: one group per tile.
                g = n0 // GROUP
                ks = tl.load(ks_base + g * stride_kst + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
                kz = tl.load(kz_base + g * stride_kst + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
            else:
                GPT: tl.constexpr = BLOCK_N // GROUP
                offs_g = n0 // GROUP + tl.arange(0, GPT)
                g_mask = (offs_g < T // GROUP)[:, None] & d_ok[None, :]
                g_off = offs_g[:, None] * stride_kst + offs_d[None, :]
                ks = tl.load(ks_base + g_off, mask=g_mask, other=0.0).to(tl.float32)
                kz = tl.load(kz_base + g_off, mask=g_mask, other=0.0).to(tl.float32)
                ks = tl.reshape(tl.broadcast_to(ks[:, None, :], (GPT, GROUP, BLOCK_D)), (BLOCK_N, BLOCK_D))
                kz = tl.reshape(tl.broadcast_to(kz[:, None, :], (GPT, GROUP, BLOCK_D)), (BLOCK_N, BLOCK_D))
            k = codes * ks + kz

        # Online softmax over this tile (base 2); a fully masked row keeps m = -inf.
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision="ieee")
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        # Values [BLOCK_N, BLOCK_D]; invalid tokens load as 0 so garbage (NaN) cannot leak.
        if BITS == 0:
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=nd_ok, other=0.0).to(tl.float32)
        else:
            P2: tl.constexpr = 8 // BITS
            shifts2 = tl.arange(0, P2) * BITS
            # Each token row holds Dh/P bytes; byte c holds channels c*P .. c*P+P-1.
            offs_c = tl.arange(0, BLOCK_D // P2)
            vb = tl.load(
                v_base + offs_n[:, None] * stride_vt + offs_c[None, :],
                mask=n_ok[:, None] & (offs_c < D // P2)[None, :],
                other=0,
            ).to(tl.int32)
            vcodes = (vb[:, :, None] >> shifts2[None, None, :]) & ((1 << BITS) - 1)
            vcodes = tl.reshape(vcodes, (BLOCK_N, BLOCK_D)).to(tl.float32)
            NG: tl.constexpr = BLOCK_D // GROUP
            offs_vg = tl.arange(0, NG)
            vg_mask = n_ok[:, None] & (offs_vg < D // GROUP)[None, :]
            vg_off = offs_n[:, None] * stride_vst + offs_vg[None, :]
            vs = tl.load(vs_base + vg_off, mask=vg_mask, other=0.0).to(tl.float32)
            vz = tl.load(vz_base + vg_off, mask=vg_mask, other=0.0).to(tl.float32)
            vs = tl.reshape(tl.broadcast_to(vs[:, :, None], (BLOCK_N, NG, GROUP)), (BLOCK_N, BLOCK_D))
            vz = tl.reshape(tl.broadcast_to(vz[:, :, None], (BLOCK_N, NG, GROUP)), (BLOCK_N, BLOCK_D))
            v = vcodes * vs + vz

        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision="ieee")
        m_i = m_new

    # Partial results for this split: row = b * H_q + q head, slot = split_offset + pid_s.
    rows = (b * (H_kv * N_REP) + h * N_REP + offs_h).to(tl.int64)
    slot = rows * S_total + split_offset + pid_s
    tl.store(m_ptr + slot, m_i, mask=h_ok)
    tl.store(l_ptr + slot, l_i, mask=h_ok)
    tl.store(acc_ptr + slot[:, None] * D + offs_d[None, :], acc, mask=h_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_combine_kernel(
    # pointers: partial max / sum / unnormalised output, final output
    m_ptr, l_ptr, acc_ptr, out_ptr,
    # sizes
    S_total, D, H_q,
    # strides of out
    stride_ob, stride_oh,
    # meta-parameters
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // H_q
    h = row % H_q
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < S_total
    d_ok = offs_d < D

    m = tl.load(m_ptr + row * S_total + offs_s, mask=s_ok, other=float("-inf"))
    l = tl.load(l_ptr + row * S_total + offs_s, mask=s_ok, other=0.0)
    acc = tl.load(
        acc_ptr + (row * S_total + offs_s)[:, None] * D + offs_d[None, :],
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    # softmax = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s; empty splits have m_s = -inf.
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    num = tl.sum(w[:, None] * acc, 0)
    den = tl.sum(w * l, 0)
    out = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _check_inputs(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_recent, v_recent, bits, group_size,
                  lengths, recent_lengths, mask):
    """Validate shapes; return (bits or 0, T_q, R)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H_q, Dh], got {tuple(q.shape)}")
    B, H_q, Dh = q.shape
    if v_codes.dim() != 4 or v_codes.shape[0] != B:
        raise ValueError(f"v_codes must be [B, H_kv, T_q, ...] with B={B}, got {tuple(v_codes.shape)}")
    H_kv, T_q = v_codes.shape[1], v_codes.shape[2]
    if H_q % H_kv:
        raise ValueError(f"H_q={H_q} is not a multiple of H_kv={H_kv}")
    if bits in (None, 16):
        bits = 0
        want = {"k_codes": (k_codes, (B, H_kv, T_q, Dh)), "v_codes": (v_codes, (B, H_kv, T_q, Dh))}
    elif bits in (2, 4):
        G = group_size
        if G <= 0 or G & (G - 1) or G < 8 // bits or Dh % G or T_q % G:
            raise ValueError(f"group_size={G} must be a power of two >= {8 // bits} dividing Dh={Dh} and T_q={T_q}")
        want = {
            "k_codes": (k_codes, (B, H_kv, T_q * bits // 8, Dh)),
            "k_scale": (k_scale, (B, H_kv, T_q // G, Dh)),
            "k_zero": (k_zero, (B, H_kv, T_q // G, Dh)),
            "v_codes": (v_codes, (B, H_kv, T_q, Dh * bits // 8)),
            "v_scale": (v_scale, (B, H_kv, T_q, Dh // G)),
            "v_zero": (v_zero, (B, H_kv, T_q, Dh // G)),
        }
        for name in ("k_codes", "v_codes"):
            if want[name][0].dtype != torch.uint8:
                raise TypeError(f"{name} must be uint8, got {want[name][0].dtype}")
    else:
        raise ValueError(f"bits must be None, 16, 2 or 4, got {bits}")
    if (k_recent is None) != (v_recent is None):
        raise ValueError("pass both k_recent and v_recent, or neither")
    R = 0 if k_recent is None else k_recent.shape[2]
    if k_recent is not None:
        want["k_recent"] = (k_recent, (B, H_kv, R, Dh))
        want["v_recent"] = (v_recent, (B, H_kv, R, Dh))
    if lengths is not None:
        want["lengths"] = (lengths, (B,))
    if recent_lengths is not None:
        want["recent_lengths"] = (recent_lengths, (B,))
    if mask is not None:
        want["mask"] = (mask, (B, T_q + R))
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool, got {mask.dtype}")
    for name, (t, shape) in want.items():
        if t is None or tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {None if t is None else tuple(t.shape)}")
    return bits, T_q, R


def _split_plan(T: int, programs: int, device: torch.device, num_splits: int | None) -> tuple[int, int]:
    """(splits, tokens per split) for a segment of T tokens; chunks are _SPLIT_ALIGN-aligned."""
    if T == 0:
        return 0, _SPLIT_ALIGN
    if num_splits is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        num_splits = min(triton.cdiv(2 * sms, programs), _MAX_SPLITS)  # about two waves of programs
    num_splits = max(1, min(num_splits, triton.cdiv(T, _SPLIT_ALIGN)))
    chunk = triton.cdiv(triton.cdiv(T, num_splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return triton.cdiv(T, chunk), chunk


def decode_attention(
    q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_recent, v_recent,
    *, bits: int | None, group_size: int, scale: float,
    lengths=None, recent_lengths=None, mask=None, num_splits: int | None = None,
) -> torch.Tensor:
    """Triton decode attention; see the module docstring. ``num_splits`` caps the quantised segment's splits."""
    bits, T_q, R = _check_inputs(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_recent, v_recent,
                                 bits, group_size, lengths, recent_lengths, mask)
    B, H_q, Dh = q.shape
    H_kv = v_codes.shape[1]
    n_rep = H_q // H_kv
    for t in (q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_recent, v_recent):
        if t is not None and t.numel() and t.stride(-1) != 1:
            raise ValueError("every tensor must be contiguous in its last dim (coalesced loads)")
    if q.dtype == torch.float16:
        dot_dtype = tl.float16
    elif q.dtype == torch.bfloat16 and not _INTERPRET:  # the interpreter's bf16 tl.dot is wrong
        dot_dtype = tl.bfloat16
    else:
        dot_dtype = tl.float32

    n_q, chunk_q = _split_plan(T_q, B * H_kv, q.device, num_splits)
    n_r, chunk_r = _split_plan(R, B * H_kv, q.device, None)
    S_total = n_q + n_r
    out = torch.empty_like(q)
    if S_total == 0 or B * H_q == 0:
        return out.zero_()
    m_part = torch.empty((B * H_q, S_total), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty((B * H_q, S_total, Dh), dtype=torch.float32, device=q.device)
    mask_u8 = None if mask is None else mask.view(torch.uint8)
    meta = dict(N_REP=n_rep, HAS_MASK=mask is not None, DOT_DTYPE=dot_dtype,
                BLOCK_H=max(16, triton.next_power_of_2(n_rep)), BLOCK_D=max(16, triton.next_power_of_2(Dh)))
    mask_strides = (0, 0) if mask is None else mask_u8.stride()

    if n_q:
        quant = bits != 0
        ks, kz, vs, vz = (k_scale, k_zero, v_scale, v_zero) if quant else (k_codes, k_codes, v_codes, v_codes)
        if quant and (ks.stride() != kz.stride() or vs.stride() != vz.stride()):
            raise ValueError("scale and zero tensors must share strides")
        _decode_partial_kernel[(B * H_kv, n_q)](
            q, k_codes, ks, kz, v_codes, vs, vz, lengths, mask_u8, m_part, l_part, acc_part,
            T_q, Dh, H_kv, chunk_q, 0, S_total,
            q.stride(0), q.stride(1), *k_codes.stride()[:3], *ks.stride()[:3], *v_codes.stride()[:3],
            *vs.stride()[:3], *mask_strides, scale * math.log2(math.e),
            BITS=bits, GROUP=group_size if quant else 1, HAS_LEN=lengths is not None, **meta,
        )
    if n_r:
        mask_r = None if mask is None else mask_u8[:, T_q:]
        _decode_partial_kernel[(B * H_kv, n_r)](
            q, k_recent, k_recent, k_recent, v_recent, v_recent, v_recent, recent_lengths, mask_r,
            m_part, l_part, acc_part,
            R, Dh, H_kv, chunk_r, n_q, S_total,
            q.stride(0), q.stride(1), *k_recent.stride()[:3], *k_recent.stride()[:3], *v_recent.stride()[:3],
            *v_recent.stride()[:3], *mask_strides, scale * math.log2(math.e),
            BITS=0, GROUP=1, HAS_LEN=recent_lengths is not None, **meta,
        )
    _decode_combine_kernel[(B * H_q,)](
        m_part, l_part, acc_part, out, S_total, Dh, H_q, out.stride(0), out.stride(1),
        BLOCK_S=triton.next_power_of_2(S_total), BLOCK_D=triton.next_power_of_2(Dh),
    )
    return out


def decode_attention_reference(
    q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_recent, v_recent,
    *, bits: int | None, group_size: int, scale: float,
    lengths=None, recent_lengths=None, mask=None, num_splits: int | None = None,
) -> torch.Tensor:
    """Pure-torch oracle and CPU fallback: dequantise, then masked softmax attention (``num_splits`` is ignored)."""
    bits, T_q, R = _check_inputs(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_recent, v_recent,
                                 bits, group_size, lengths, recent_lengths, mask)
    B, H_q, Dh = q.shape
    H_kv = v_codes.shape[1]
    if bits:
        k = dequantize_keys(k_codes, k_scale, k_zero, bits, group_size)
        v = dequantize_values(v_codes, v_scale, v_zero, bits, group_size)
    else:
        k, v = k_codes.float(), v_codes.float()
    pos = torch.arange(T_q + R, device=q.device)
    valid = torch.ones((B, T_q + R), dtype=torch.bool, device=q.device)
    if lengths is not None:
        valid &= (pos[None, :] >= T_q) | (pos[None, :] < lengths.long()[:, None])
    if R:
        k = torch.cat([k, k_recent.float()], dim=2)
        v = torch.cat([v, v_recent.float()], dim=2)
        if recent_lengths is not None:
            valid &= (pos[None, :] < T_q) | (pos[None, :] - T_q < recent_lengths.long()[:, None])
    if mask is not None:
        valid &= mask
    vmask = valid[:, None, :, None]
    k = torch.where(vmask, k, 0.0)  # invalid slots may hold garbage (NaN) in a static cache
    v = torch.where(vmask, v, 0.0)
    qg = q.float().reshape(B, H_kv, H_q // H_kv, Dh)
    s = torch.einsum("bgrd,bgtd->bgrt", qg, k) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.where(valid.any(-1)[:, None, None, None], p, 0.0)
    out = torch.einsum("bgrt,bgtd->bgrd", p, v)
    return out.reshape(B, H_q, Dh).to(q.dtype)
