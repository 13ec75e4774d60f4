"""kernels.quant: GRACE/AWQ loading and validation, packing, quantize(), reference qmatmul."""

from __future__ import annotations

import pytest
import torch

from kernels import QuantizationError, QuantizedWeight, qmatmul, quantize
from kernels.quant import AWQ_ORDER

QRANGE = {8: (-128, 127), 4: (-8, 7)}


def make_grace(n: int, k: int, bits: int, seed: int = 0, group: int = 128):
    """Random codes + positive scales -> (W = bf16(q*s), log_scale, codes, scales) as GRACE stores them."""
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = QRANGE[bits]
    g = group if k % group == 0 else k
    codes = torch.randint(qmin, qmax + 1, (n, k), generator=gen, dtype=torch.int32).to(torch.int8)
    log_scale = torch.empty(n * (k // g)).uniform_(-7.0, -3.0, generator=gen)
    scales = torch.exp(log_scale).reshape(n, k // g)
    w = (codes.float() * scales.repeat_interleave(g, dim=1)).to(torch.bfloat16)
    return w, log_scale, codes, scales


def scale_at(scales: torch.Tensor, n: int, k: int, g: int) -> float:
    return scales[n, k // g].item()


# ----------------------------------------------------------------------------- from_grace


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k", [256, 384, 200])  # 200: K % 128 != 0 -> one group per row
def test_from_grace_round_trip(bits: int, k: int) -> None:
    n = 24
    w, log_scale, codes, scales = make_grace(n, k, bits, seed=bits + k)
    qw = QuantizedWeight.from_grace(w, log_scale, bits, name="layer.q_proj")
    g = 128 if k % 128 == 0 else k
    assert (qw.bits, qw.group_size, qw.out_features, qw.in_features) == (bits, g, n, k)
    assert qw.scales.shape == (n, k // g)
    assert torch.equal(qw.codes(), codes)
    exact = codes.float() * scales.repeat_interleave(g, dim=1)
    assert torch.equal(qw.dequantize(), exact)
    assert torch.equal(qw.dequantize(torch.bfloat16), w)
    if bits == 4:
        assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (n, k // 2)
    else:
        assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == (n, k)


def test_from_grace_accepts_fp32_weight_and_other_exp() -> None:
    # A scale computed by another exp implementation (last fp32 bits differ) must still load.
    w, log_scale, codes, scales = make_grace(64, 256, 8, seed=3)
    s_alt = torch.exp(log_scale.double()).float().reshape(scales.shape) * (1 + 2**-22)
    w_alt = (codes.float() * s_alt.repeat_interleave(128, dim=1)).to(torch.bfloat16)
    qw = QuantizedWeight.from_grace(w_alt, log_scale, 8, name="alt")
    assert torch.equal(qw.codes(), codes)
    qw32 = QuantizedWeight.from_grace(w.float(), log_scale, 8, name="fp32")
    assert torch.equal(qw32.codes(), codes)


def test_from_grace_length_mismatch() -> None:
    w, log_scale, _, _ = make_grace(8, 256, 8)
    with pytest.raises(QuantizationError) as e:
        QuantizedWeight.from_grace(w, log_scale[:-1], 8, name="model.layers.3.mlp.up_proj")
    msg = str(e.value)
    assert "model.layers.3.mlp.up_proj" in msg and "length mismatch" in msg
    assert "16" in msg and "15" in msg  # both numbers


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_from_grace_bad_scale(bad: float) -> None:
    w, log_scale, _, _ = make_grace(8, 256, 8)
    log_scale = log_scale.clone()
    log_scale[5] = bad
    with pytest.raises(QuantizationError) as e:
        QuantizedWeight.from_grace(w, log_scale, 8, name="l.k_proj")
    msg = str(e.value)
    assert "l.k_proj" in msg and "non-finite log_scale" in msg and "flat index 5 (row 2, group 1)" in msg


def test_from_grace_scale_underflow() -> None:
    w, log_scale, _, _ = make_grace(8, 256, 8)
    log_scale = log_scale.clone()
    log_scale[3] = -200.0  # exp() underflows to 0
    with pytest.raises(QuantizationError, match=r"l\.v_proj.*non-positive scale"):
        QuantizedWeight.from_grace(w, log_scale, 8, name="l.v_proj")


def test_from_grace_non_finite_weight() -> None:
    w, log_scale, _, _ = make_grace(8, 256, 4)
    w[2, 7] = float("nan")
    with pytest.raises(QuantizationError, match=r"l\.w.*non-finite weight at \(2, 7\)"):
        QuantizedWeight.from_grace(w, log_scale, 4, name="l.w")


@pytest.mark.parametrize(("bits", "factor"), [(8, 200.0), (8, 128.0), (4, 9.0), (4, -9.0)])
def test_from_grace_code_out_of_range(bits: int, factor: float) -> None:
    w, log_scale, _, scales = make_grace(8, 256, bits)
    w[3, 130] = factor * scale_at(scales, 3, 130, 128)
    with pytest.raises(QuantizationError) as e:
        QuantizedWeight.from_grace(w, log_scale, bits, name="l.gate_proj")
    msg = str(e.value)
    assert "l.gate_proj" in msg and "out of range" in msg and "(3, 130)" in msg


@pytest.mark.parametrize("bits", [8, 4])
def test_from_grace_off_grid(bits: int) -> None:
    w, log_scale, _, scales = make_grace(8, 256, bits)
    s = scale_at(scales, 6, 200, 128)
    # Small code: bf16 resolves 0.37 grid steps there (near code 127 the grid is only 1-4 bf16 ulps).
    w[6, 200] = (5 * s + 0.37 * s) if bits == 8 else (3 * s + 0.37 * s)
    with pytest.raises(QuantizationError) as e:
        QuantizedWeight.from_grace(w, log_scale, bits, name="l.o_proj")
    msg = str(e.value)
    assert "l.o_proj" in msg and "not on the quantization grid" in msg and "(6, 200)" in msg


def test_from_grace_scale_mismatch_detected() -> None:
    # A sidecar from another checkpoint: scales off by 3 % -> most elements off the grid.
    w, log_scale, _, _ = make_grace(8, 256, 4)
    with pytest.raises(QuantizationError, match="not on the quantization grid"):
        QuantizedWeight.from_grace(w, log_scale + 0.03, 4, name="x")


# ----------------------------------------------------------------------------- packing, from_codes


def test_int4_nibble_layout() -> None:
    codes = torch.tensor([[-8, 7, -1, 0, 1, -2]], dtype=torch.int8)
    qw = QuantizedWeight.from_codes(codes, torch.ones(1, 1), bits=4, group_size=128)
    # low nibble = even k, high nibble = odd k, two's complement.
    assert qw.qweight.tolist() == [[0x78, 0x0F, 0xE1]]
    assert torch.equal(qw.codes(), codes)


def test_from_codes_validation() -> None:
    with pytest.raises(QuantizationError, match=r"name1.*out of range"):
        QuantizedWeight.from_codes(
            torch.full((2, 128), 8, dtype=torch.int8), torch.ones(2, 1), 4, name="name1"
        )
    with pytest.raises(QuantizationError, match=r"name2.*scales shape mismatch"):
        QuantizedWeight.from_codes(torch.zeros(2, 256, dtype=torch.int8), torch.ones(2, 1), 8, name="name2")
    with pytest.raises(QuantizationError, match=r"name3.*non-positive scale"):
        QuantizedWeight.from_codes(torch.zeros(2, 128, dtype=torch.int8), torch.zeros(2, 1), 8, name="name3")


@pytest.mark.parametrize("bits", [8, 4])
def test_odd_group_counts_and_to(bits: int) -> None:
    w, log_scale, codes, _ = make_grace(5, 3 * 128, bits, seed=11)  # 3 groups, odd N
    qw = QuantizedWeight.from_grace(w, log_scale, bits, name="odd")
    assert qw.scales.shape == (5, 3)
    assert torch.equal(qw.codes(), codes)
    moved = qw.to("cpu")
    assert torch.equal(moved.codes(), codes) and torch.equal(moved.scales, qw.scales)
    expected = 5 * 3 * 128 * bits // 8 + 5 * 3 * 4
    assert qw.nbytes == expected


def test_cat() -> None:
    parts = [make_grace(n, 256, 4, seed=n) for n in (16, 8, 8)]
    qws = [QuantizedWeight.from_grace(w, ls, 4) for w, ls, _, _ in parts]
    fused = QuantizedWeight.cat(qws)
    assert fused.out_features == 32 and fused.in_features == 256
    assert torch.equal(fused.codes(), torch.cat([c for _, _, c, _ in parts]))
    assert torch.equal(fused.dequantize(), torch.cat([q.dequantize() for q in qws]))
    with pytest.raises(ValueError):
        QuantizedWeight.cat([qws[0], quantize(torch.randn(8, 256), bits=8)])
    with pytest.raises(ValueError):
        QuantizedWeight.cat([qws[0], quantize(torch.randn(8, 384), bits=4)])


# ----------------------------------------------------------------------------- AWQ


def pack_awq_by_hand(values: list[list[int]]) -> torch.Tensor:
    """Pack unsigned 4-bit values [R][8C] into int32 [R, C] the AutoAWQ GEMM way, in plain Python."""
    rows = []
    for row in values:
        words = []
        for c in range(len(row) // 8):
            word = 0
            for i, col in enumerate(AWQ_ORDER):
                word |= row[8 * c + col] << (4 * i)
            words.append(word - (1 << 32) if word >= 1 << 31 else word)
        rows.append(words)
    return torch.tensor(rows, dtype=torch.int32)


def unpack_awq_by_hand(qweight: torch.Tensor) -> list[list[int]]:
    out = []
    for row in qweight.tolist():
        vals = [0] * (8 * len(row))
        for c, word in enumerate(row):
            for i, col in enumerate(AWQ_ORDER):
                vals[8 * c + col] = (word >> (4 * i)) & 0xF
        out.append(vals)
    return out


def make_awq(k: int = 256, n: int = 24, seed: int = 0, g: int = 128):
    gen = torch.Generator().manual_seed(seed)
    ucodes = torch.randint(0, 16, (k, n), generator=gen).tolist()
    qweight = pack_awq_by_hand(ucodes)
    qzeros = pack_awq_by_hand([[8] * n for _ in range(k // g)])
    scales = (torch.rand(k // g, n, generator=gen) * 0.01 + 1e-3).to(torch.float16)
    return qweight, qzeros, scales


def test_from_awq_matches_hand_unpacking() -> None:
    k, n, g = 256, 24, 128
    qweight, qzeros, scales = make_awq(k, n)
    ucodes = unpack_awq_by_hand(qweight)
    zeros = unpack_awq_by_hand(qzeros)
    expected = torch.empty(n, k)
    for kk in range(k):
        for nn in range(n):
            expected[nn, kk] = scales[kk // g, nn].float() * (ucodes[kk][nn] - zeros[kk // g][nn])
    qw = QuantizedWeight.from_awq(qweight, qzeros, scales, name="awq.layer")
    assert (qw.bits, qw.group_size, qw.out_features, qw.in_features) == (4, g, n, k)
    assert torch.equal(qw.dequantize(), expected)
    assert torch.equal(qw.codes(), (torch.tensor(ucodes) - 8).t().to(torch.int8))


def test_awq_round_trip() -> None:
    qweight, qzeros, scales = make_awq(384, 16, seed=5)
    qw = QuantizedWeight.from_awq(qweight, qzeros, scales)
    q2, z2, s2 = qw.to_awq()
    assert torch.equal(q2, qweight) and torch.equal(z2, qzeros) and torch.equal(s2, scales)
    assert q2.dtype == torch.int32 and s2.dtype == torch.float16
    # and the other way round, from our layout
    w, ls, codes, _ = make_grace(16, 256, 4, seed=9)
    mine = QuantizedWeight.from_grace(w, ls, 4)
    back = QuantizedWeight.from_awq(*mine.to_awq())
    assert torch.equal(back.codes(), codes)


def test_from_awq_refuses_asymmetric_zero() -> None:
    qweight, _, scales = make_awq(256, 16)
    zeros = [[8] * 16, [8] * 16]
    zeros[1][5] = 7
    with pytest.raises(QuantizationError) as e:
        QuantizedWeight.from_awq(qweight, pack_awq_by_hand(zeros), scales, name="awq.down_proj")
    msg = str(e.value)
    assert "awq.down_proj" in msg and "not symmetric" in msg and "column 5" in msg


def test_from_awq_refuses_bad_shapes_and_scales() -> None:
    qweight, qzeros, scales = make_awq(256, 16)
    with pytest.raises(QuantizationError, match=r"awq\.a.*scales shape mismatch"):
        QuantizedWeight.from_awq(qweight, qzeros, scales[:, :8], name="awq.a")
    with pytest.raises(QuantizationError, match=r"awq\.b.*qzeros shape mismatch"):
        QuantizedWeight.from_awq(qweight, qzeros[:1], scales, name="awq.b")
    bad = scales.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(QuantizationError, match=r"awq\.c.*non-finite scale"):
        QuantizedWeight.from_awq(qweight, qzeros, bad, name="awq.c")
    with pytest.raises(QuantizationError, match=r"awq\.d.*int32"):
        QuantizedWeight.from_awq(qweight.to(torch.int64), qzeros, scales, name="awq.d")


# ----------------------------------------------------------------------------- quantize()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k", [256, 200])
def test_quantize_error_bound_and_zero_groups(bits: int, k: int) -> None:
    w = torch.randn(12, k) * torch.rand(12, 1) * 3
    w[4] = 0.0  # whole row zero: every group of it is zero
    if k == 256:
        w[7, 128:] = 0.0  # one zero group in a non-zero row
    qw = quantize(w.to(torch.bfloat16), bits=bits, name="q")
    g = qw.group_size
    assert g == (128 if k % 128 == 0 else k)
    assert torch.isfinite(qw.scales).all() and (qw.scales > 0).all()
    qmax = QRANGE[bits][1]
    assert int(qw.codes().abs().max()) <= qmax
    wq = w.to(torch.bfloat16).float()
    err = (qw.dequantize() - wq).abs()
    bound = qw.scales.repeat_interleave(g, dim=1) / 2
    assert (err <= bound * (1 + 1e-5)).all()
    assert (qw.dequantize()[4] == 0).all()
    if k == 256:
        assert (qw.dequantize()[7, 128:] == 0).all()


# ----------------------------------------------------------------------------- qmatmul


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_qmatmul_reference(bits: int, dtype: torch.dtype, m: int) -> None:
    w, ls, _, _ = make_grace(40, 384, bits, seed=m)
    qw = QuantizedWeight.from_grace(w, ls, bits)
    x = torch.randn(m, 384).to(dtype)
    ref = x.float() @ qw.dequantize().t()
    for backend in ("auto", "reference"):
        y = qmatmul(x, qw, backend=backend)
        assert y.dtype == dtype and y.shape == (m, 40)
        rel = ((y.float() - ref).norm() / ref.norm()).item()
        assert rel < {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]


def test_qmatmul_batched_bias_fp64_and_errors() -> None:
    qw = quantize(torch.randn(24, 256), bits=8)
    qw.cache_dequantized = True
    x = torch.randn(2, 5, 256, dtype=torch.float64)
    bias = torch.randn(24)
    y = qmatmul(x, qw, bias=bias)
    assert y.dtype == torch.float64 and y.shape == (2, 5, 24)
    ref = x @ qw.dequantize(torch.float64).t() + bias.double()
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert qw._dequant_cache is not None and qw._dequant_cache[0] == torch.float64
    with pytest.raises(ValueError, match="unknown qmatmul backend"):
        qmatmul(x, qw, backend="cuda-magic")
    with pytest.raises(ValueError, match="input features"):
        qmatmul(torch.randn(3, 128), qw)
