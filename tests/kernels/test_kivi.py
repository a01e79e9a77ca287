"""KIVI quantise / dequantise (pure torch): layouts, error bounds, SQNR floors."""

import pytest
import torch

from rarefy.kernels.kivi import (
    dequantize_keys,
    dequantize_values,
    pack_codes,
    quantize_keys,
    quantize_values,
    unpack_codes,
)


def _sqnr_db(x, y):
    return (10 * torch.log10(x.pow(2).mean() / (x - y).pow(2).mean())).item()


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_is_lsb_first_and_roundtrips(bits):
    per_byte = 8 // bits
    codes = torch.arange(2 * per_byte, dtype=torch.uint8).remainder(1 << bits).reshape(1, -1)
    packed = pack_codes(codes, bits, dim=-1)
    assert packed.shape == (1, 2) and packed.dtype == torch.uint8
    expect = sum(int(codes[0, j]) << (j * bits) for j in range(per_byte))
    assert int(packed[0, 0]) == expect  # first code in the lowest bits
    gen = torch.Generator().manual_seed(0)
    c = torch.randint(0, 1 << bits, (3, 8, 5), generator=gen, dtype=torch.uint8)
    for dim in (0, 1, -1) if bits == 2 else (1,):
        if c.shape[dim] % per_byte == 0:
            assert torch.equal(unpack_codes(pack_codes(c, bits, dim), bits, dim), c)


@pytest.mark.parametrize("bits", [2, 4])
def test_layouts_keys_along_tokens_values_along_channels(bits):
    B, H, T, Dh, G = 2, 3, 64, 32, 32
    x = torch.randn(B, H, T, Dh, generator=torch.Generator().manual_seed(1))
    kc, ks, kz = quantize_keys(x, bits, G)
    vc, vs, vz = quantize_values(x, bits, G)
    assert kc.shape == (B, H, T * bits // 8, Dh) and kc.dtype == torch.uint8
    assert ks.shape == kz.shape == (B, H, T // G, Dh) and ks.dtype == torch.float16
    assert vc.shape == (B, H, T, Dh * bits // 8) and vc.dtype == torch.uint8
    assert vs.shape == vz.shape == (B, H, T, Dh // G)
    mask = (1 << bits) - 1
    # Token 1 of channel 5 sits in bits [bits, 2*bits) of key byte row 0; channel 1 of token 5 likewise.
    k_code = torch.round((x[0, 0, 1, 5] - kz[0, 0, 0, 5].float()) / ks[0, 0, 0, 5].float()).clamp(0, mask)
    assert int(kc[0, 0, 0, 5] >> bits) & mask == int(k_code)
    v_code = torch.round((x[0, 0, 5, 1] - vz[0, 0, 5, 0].float()) / vs[0, 0, 5, 0].float()).clamp(0, mask)
    assert int(vc[0, 0, 5, 0] >> bits) & mask == int(v_code)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("G", [32, 128])
def test_error_bounded_by_half_step(bits, G):
    x = torch.randn(1, 2, 128, 128, generator=torch.Generator().manual_seed(2)) * 3
    kc, ks, kz = quantize_keys(x, bits, G, scale_dtype=torch.float32)
    k_hat = dequantize_keys(kc, ks, kz, bits, G)
    step_k = ks.float().repeat_interleave(G, dim=-2)
    assert ((x - k_hat).abs() <= step_k / 2 + 1e-5).all()
    vc, vs, vz = quantize_values(x, bits, G, scale_dtype=torch.float32)
    v_hat = dequantize_values(vc, vs, vz, bits, G)
    step_v = vs.float().repeat_interleave(G, dim=-1)
    assert ((x - v_hat).abs() <= step_v / 2 + 1e-5).all()


# Floors: uniform asymmetric quantisation of Gaussian groups measures ~22 dB at
# 4 bits / G=32 and ~8 dB at 2 bits / G=32 (~20 and ~6 dB at G=128); the floors
# sit ~1.5 dB below so only a real regression (wrong step, wrong group) trips them.
@pytest.mark.parametrize("bits,G,floor_db", [(4, 32, 20.5), (4, 128, 18.5), (2, 32, 6.5), (2, 128, 4.5)])
def test_sqnr_floor_fp16_scales(bits, G, floor_db):
    x = torch.randn(2, 2, 256, 128, generator=torch.Generator().manual_seed(3))
    kc, ks, kz = quantize_keys(x, bits, G)
    vc, vs, vz = quantize_values(x, bits, G)
    assert _sqnr_db(x, dequantize_keys(kc, ks, kz, bits, G)) > floor_db
    assert _sqnr_db(x, dequantize_values(vc, vs, vz, bits, G)) > floor_db


def test_per_channel_keys_beat_per_token_on_outlier_channels():
    # KIVI's premise: keys have outlier channels, so per-channel groups keep the
    # other channels' resolution; per-token groups stretch every step by the outlier.
    x = torch.randn(1, 2, 128, 128, generator=torch.Generator().manual_seed(4))
    x[..., ::16] *= 20
    kc, ks, kz = quantize_keys(x, 2, 32)
    vc, vs, vz = quantize_values(x, 2, 32)
    per_channel = _sqnr_db(x, dequantize_keys(kc, ks, kz, 2, 32))
    per_token = _sqnr_db(x, dequantize_values(vc, vs, vz, 2, 32))
    assert per_channel > per_token + 2.0


def test_constant_groups_are_exact_and_bad_shapes_raise():
    x = torch.full((1, 1, 32, 32), 0.375)
    kc, ks, kz = quantize_keys(x, 2, 32)
    assert torch.equal(dequantize_keys(kc, ks, kz, 2, 32), x)
    vc, vs, vz = quantize_values(x, 4, 32)
    assert torch.equal(dequantize_values(vc, vs, vz, 4, 32), x)
    with pytest.raises(ValueError):
        quantize_keys(torch.randn(1, 1, 48, 32), 2, 32)  # T not a multiple of G
    with pytest.raises(ValueError):
        quantize_values(torch.randn(1, 1, 4, 48), 2, 32)  # Dh not a multiple of G
    with pytest.raises(ValueError):
        quantize_values(torch.randn(1, 1, 4, 32), 3, 32)
