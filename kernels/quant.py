"""Weight-only, symmetric, group-quantized linear weights (GRACE W8G128 / W4G128).

The quantizer (see shared/GRACE_FORMAT.md): signed codes without zero point,
one positive fp32 scale per group of ``group_size`` consecutive elements along
the input dimension K of a weight ``[N, K]``; when ``K % group_size != 0`` the
whole row is one group.  ``W[n, k] = q[n, k] * s[n, k // group_size]``.

This module converts the two on-disk forms (GRACE fake-quantized bf16 weights
plus ``log_scale``, and AutoAWQ "GEMM" packed int4) into one in-memory layout,
:class:`QuantizedWeight`, validating them on the way: a corrupt or mismatched
checkpoint must be refused with a message naming the tensor, never served.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import backend as kernel_backend

__all__ = [
    "AWQ_ORDER",
    "QuantizationError",
    "QuantizedWeight",
    "effective_group_size",
    "qmatmul",
    "quantize",
]

# AutoAWQ GEMM packing: the code of column 8c + AWQ_ORDER[i] sits at bits 4i..4i+3 of word c.
AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
# GRACE maps its symmetric signed int4 codes to AWQ's unsigned form with a constant zero point.
AWQ_SYMMETRIC_ZERO = 8

_QRANGE: dict[int, tuple[int, int]] = {8: (-128, 127), 4: (-8, 7)}


class QuantizationError(ValueError):
    """A quantized tensor is inconsistent (shape, scale, code range or grid); the message names it."""


def effective_group_size(in_features: int, group_size: int) -> int:
    """Group length actually used along K: ``group_size``, or K itself when K is not a multiple."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    return group_size if in_features % group_size == 0 else in_features


def _check_bits(bits: int) -> tuple[int, int]:
    if bits not in _QRANGE:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    return _QRANGE[bits]


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at the magnitude of each element of ``x`` (fp32); 0 for zeros/subnormals."""
    # Keep only the fp32 exponent bits: that is 2**floor(log2|x|). bf16 has 8 significant bits,
    # so its ulp in that binade is 2**(floor(log2|x|) - 7). Bit ops: far cheaper than frexp.
    pow2 = (x.to(torch.float32).contiguous().view(torch.int32) & 0x7F800000).view(torch.float32)
    return pow2.mul_(2.0**-7)


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] in -8..7 -> uint8 [N, K//2]; low nibble = even k, high nibble = odd k."""
    c = codes.to(torch.int16) & 0xF  # two's complement nibble
    return (c[:, 0::2] | (c[:, 1::2] << 4)).to(torch.uint8)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_int4`: uint8 [N, K//2] -> int8 [N, K] signed codes."""
    b = packed.to(torch.int16)
    lo = b & 0xF
    hi = (b >> 4) & 0xF
    both = torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
    return ((both ^ 8) - 8).to(torch.int8)  # sign-extend the 4-bit two's complement


def _fmt_index(flat_index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    idx = []
    for dim in reversed(shape):
        idx.append(flat_index % dim)
        flat_index //= dim
    return tuple(reversed(idx))


def _check_scales(scales: torch.Tensor, name: str, what: str = "scale") -> None:
    """Refuse non-finite or non-positive scales ``[N, groups]``, reporting the first offender."""
    for kind, bad in (("non-finite", ~torch.isfinite(scales)), ("non-positive", scales <= 0)):
        if bool(bad.any()):
            i = int(bad.flatten().nonzero()[0])
            row, grp = _fmt_index(i, tuple(scales.shape))
            raise QuantizationError(
                f"{name}: {kind} {what} at flat index {i} (row {row}, group {grp}): "
                f"{scales.flatten()[i].item()!r}; {int(bad.sum())} {kind} in total"
            )


@dataclass(eq=False)
class QuantizedWeight:
    """A group-quantized linear weight ``W [N, K]`` (y = x @ W^T), symmetric, no zero point.

    Layout (read by the Triton kernels; keep in sync):

    - ``scales``: float32 ``[N, K // group_size]``, contiguous; ``scales[n, j]`` scales row n,
      input columns ``j*group_size .. (j+1)*group_size - 1``. Always > 0.
    - ``bits == 8``: ``qweight`` int8 ``[N, K]``, row-major; ``qweight[n, k]`` is the signed code
      (-128..127) of ``W[n, k]``.
    - ``bits == 4``: ``qweight`` uint8 ``[N, K // 2]``, row-major (K must be even). Byte
      ``qweight[n, j]`` holds two signed 4-bit codes along K: bits 0..3 (low nibble) = code of
      ``k = 2j``, bits 4..7 (high nibble) = code of ``k = 2j + 1``, each stored as a two's
      complement nibble (-8..7; e.g. -1 = 0xF, -8 = 0x8). Decode nibble h (0 = low): ``(((b >> 4*h) & 0xF) ^ 8) - 8``.
      A group of 128 codes is 64 consecutive bytes of one row.
    - ``W[n, k] = code[n, k] * scales[n, k // group_size]``.

    ``group_size`` is the effective group: the requested one (128), or K when K is not a
    multiple of it (the whole row is one group).

    ``cache_dequantized``: when True, the reference matmul keeps the last dequantized weight
    (one dtype/device at a time) in ``_dequant_cache``. Off by default: at fp32 it is 4x (8-bit)
    or 8x (4-bit) the packed size, which is only acceptable for small CPU models and tests.
    """

    bits: int
    group_size: int
    out_features: int
    in_features: int
    qweight: torch.Tensor
    scales: torch.Tensor
    cache_dequantized: bool = False
    _dequant_cache: tuple[torch.dtype, torch.device, torch.Tensor] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # Cheap structural checks: the kernels index these tensors blindly.
        _check_bits(self.bits)
        n, k, g = self.out_features, self.in_features, self.group_size
        if g <= 0 or k % g != 0:
            raise ValueError(f"group_size {g} does not divide in_features {k}")
        if self.bits == 8:
            want_shape, want_dtype = (n, k), torch.int8
        else:
            if k % 2:
                raise ValueError(f"4-bit weights need an even in_features, got {k}")
            want_shape, want_dtype = (n, k // 2), torch.uint8
        if tuple(self.qweight.shape) != want_shape or self.qweight.dtype != want_dtype:
            raise ValueError(
                f"{self.bits}-bit qweight must be {want_dtype} {list(want_shape)}, "
                f"got {self.qweight.dtype} {list(self.qweight.shape)}"
            )
        if tuple(self.scales.shape) != (n, k // g) or self.scales.dtype != torch.float32:
            raise ValueError(
                f"scales must be float32 [{n}, {k // g}], got {self.scales.dtype} {list(self.scales.shape)}"
            )

    # ------------------------------------------------------------------ accessors

    @property
    def num_groups(self) -> int:
        """Groups per row (K // group_size)."""
        return self.in_features // self.group_size

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed codes and the scales (what a kernel streams)."""
        return self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * 4

    def codes(self) -> torch.Tensor:
        """Signed integer codes, int8 ``[N, K]`` (unpacked for 4-bit; ``qweight`` itself for 8-bit)."""
        if self.bits == 8:
            return self.qweight
        return _unpack_int4(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W [N, K]`` = codes * scales, computed in fp32 (fp64 if asked) then cast to ``dtype``."""
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        n, k, g = self.out_features, self.in_features, self.group_size
        out = torch.empty(n, k, dtype=dtype, device=self.device)
        # Row blocks of ~4 M elements: the fp32 temporaries are reused heap blocks, not fresh
        # page-faulted mappings of the whole weight (3x faster at the 2B shapes on CPU).
        rows = max(1, (1 << 22) // k)
        for r in range(0, n, rows):
            packed = self.qweight[r : r + rows]
            q = (packed if self.bits == 8 else _unpack_int4(packed)).to(compute).view(-1, self.num_groups, g)
            out[r : r + rows] = (q * self.scales[r : r + rows].to(compute).unsqueeze(-1)).view(-1, k)
        return out

    def dequantized_cached(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """:meth:`dequantize`, memoized (last dtype/device only) when ``cache_dequantized`` is set."""
        if not self.cache_dequantized:
            return self.dequantize(dtype)
        c = self._dequant_cache
        if c is not None and c[0] == dtype and c[1] == self.device:
            return c[2]
        w = self.dequantize(dtype)
        self._dequant_cache = (dtype, self.device, w)
        return w

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """A copy on ``device`` (the dequantization cache is not carried over)."""
        return QuantizedWeight(
            bits=self.bits,
            group_size=self.group_size,
            out_features=self.out_features,
            in_features=self.in_features,
            qweight=self.qweight.to(device),
            scales=self.scales.to(device),
            cache_dequantized=self.cache_dequantized,
        )

    def __repr__(self) -> str:
        return (
            f"QuantizedWeight(bits={self.bits}, group_size={self.group_size}, "
            f"out_features={self.out_features}, in_features={self.in_features}, device={self.device})"
        )

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        bits: int,
        group_size: int = 128,
        name: str = "?",
    ) -> QuantizedWeight:
        """Build from signed integer codes ``[N, K]`` and positive scales ``[N, K // G]``.

        ``group_size`` is the requested group; it becomes K when K is not a multiple of it.
        """
        qmin, qmax = _check_bits(bits)
        if codes.dim() != 2:
            raise QuantizationError(f"{name}: codes must be 2-D [N, K], got shape {list(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.dtype.is_complex:
            raise QuantizationError(f"{name}: codes must be an integer tensor, got {codes.dtype}")
        n, k = codes.shape
        g = effective_group_size(k, group_size)
        if tuple(scales.shape) != (n, k // g):
            raise QuantizationError(
                f"{name}: scales shape mismatch: expected [{n}, {k // g}] for weight [{n}, {k}] "
                f"with group size {g}, got {list(scales.shape)}"
            )
        scales = scales.to(torch.float32).contiguous()
        _check_scales(scales, name)
        codes_wide = codes.to(torch.int32)
        bad = (codes_wide < qmin) | (codes_wide > qmax)
        if bool(bad.any()):
            i = int(bad.flatten().nonzero()[0])
            raise QuantizationError(
                f"{name}: code out of range for {bits}-bit ({qmin}..{qmax}) at {_fmt_index(i, (n, k))}: "
                f"{int(codes_wide.flatten()[i])}"
            )
        return cls._from_valid_codes(codes_wide.to(torch.int8), scales, bits, g)

    @classmethod
    def _from_valid_codes(
        cls, codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int
    ) -> QuantizedWeight:
        n, k = codes.shape
        if bits == 4 and k % 2:
            raise QuantizationError(f"4-bit packing needs an even in_features, got K={k}")
        qweight = codes.contiguous() if bits == 8 else _pack_int4(codes).contiguous()
        return cls(bits, group_size, n, k, qweight, scales.contiguous())

    @classmethod
    def from_grace(
        cls,
        weight: torch.Tensor,
        log_scale: torch.Tensor,
        bits: int,
        group_size: int = 128,
        name: str = "?",
    ) -> QuantizedWeight:
        """Recover codes from a GRACE QAT fake-quantized weight and its ``log_scale``.

        ``weight``: bf16 (or fp32) ``[N, K]`` holding ``bf16(q * s)``; ``log_scale``: fp32 with
        ``N * K / G`` elements, ``s = exp(log_scale).reshape(N, K // G)``. Codes are
        ``round(W / s)`` (exact: bf16's relative error 2**-9 times 127 is < 0.5).

        Verified, refusing with :class:`QuantizationError` naming ``name``: element count,
        finite positive scales, finite weights, codes within range, and ``q * s`` reproducing W
        to within one bf16 ulp of W (the product computed in fp32, compared with W in fp32).
        Why one ulp: GRACE wrote ``bf16(q * exp(log_scale))`` with an fp32 scale, which is within
        half an ulp of the exact product; the other half is margin for an ``exp`` that differs
        in the last fp32 bits (another library or device) and would flip a near-tie rounding.
        A tighter check could reject genuine checkpoints; a looser one lets shifted weights
        through. Note that bf16 cannot see an off-grid error much below one ulp: for codes near
        127 the grid step is only 1-4 bf16 ulps, so there only gross corruption is detectable;
        a mismatched sidecar (scales off by more than ~1 %) is caught on most elements.
        """
        qmin, qmax = _check_bits(bits)
        if weight.dim() != 2:
            raise QuantizationError(f"{name}: weight must be 2-D [N, K], got shape {list(weight.shape)}")
        n, k = weight.shape
        g = effective_group_size(k, group_size)
        ng = k // g
        if log_scale.numel() != n * ng:
            raise QuantizationError(
                f"{name}: log_scale length mismatch: weight [{n}, {k}] with group size {g} needs "
                f"{n * ng} scales (N*K/G), log_scale has {log_scale.numel()}"
            )
        ls = log_scale.detach().to(device=weight.device, dtype=torch.float32).reshape(n, ng)
        if not bool(torch.isfinite(ls).all()):
            _check_scales(ls, name, what="log_scale")  # reports the NaN/inf log_scale itself
        scales = torch.exp(ls)
        _check_scales(scales, name)  # exp underflow to 0 is refused here

        # Few full-size passes: this runs on every quantized weight at load (1.4 B elements for
        # the 2B model). NaN propagates through aminmax and inf lands out of range, so
        # non-finite weights are looked for only when the range check fails.
        w = weight.detach().to(torch.float32)
        w3 = w.reshape(n, ng, g)
        s3 = scales.unsqueeze(-1)
        q = torch.div(w3, s3).round_()
        lo, hi = (float(v) for v in torch.aminmax(q)) if q.numel() else (0.0, 0.0)
        if not (lo >= qmin and hi <= qmax):
            bad = ~torch.isfinite(w)
            if bool(bad.any()):
                i = int(bad.flatten().nonzero()[0])
                raise QuantizationError(
                    f"{name}: non-finite weight at {_fmt_index(i, (n, k))}: {w.flatten()[i].item()!r}"
                )
            # Codes must fit the signed range; report the element furthest outside.
            excess = (torch.clamp(q - qmax, min=0) + torch.clamp(qmin - q, min=0)).reshape(n, k)
            ni, ki = _fmt_index(int(excess.argmax()), (n, k))
            raise QuantizationError(
                f"{name}: code out of range for {bits}-bit ({qmin}..{qmax}): "
                f"{int((excess > 0).sum())} element(s); worst at ({ni}, {ki}): weight {w[ni, ki].item()!r}, "
                f"scale {scales[ni, ki // g].item()!r}, weight/scale {w[ni, ki].item() / scales[ni, ki // g].item():.4f}"
            )

        # q*s must reproduce W to bf16 rounding (see docstring for the one-ulp tolerance).
        # W == 0 gives q == 0 and err == 0 <= tol == 0.
        err = torch.mul(q, s3).reshape(n, k).sub_(w).abs_()
        tol = _bf16_ulp(w)
        if bool((err > tol).any()):
            recon = (q * s3).reshape(n, k)
            ratio = err / tol.clamp(min=torch.finfo(torch.float32).tiny)
            i = int(ratio.argmax())
            ni, ki = _fmt_index(i, (n, k))
            raise QuantizationError(
                f"{name}: weight not on the quantization grid (q*s does not reproduce it to bf16 "
                f"rounding): {int((err > tol).sum())} element(s); worst at ({ni}, {ki}): weight "
                f"{w[ni, ki].item()!r}, nearest grid value {recon[ni, ki].item()!r} "
                f"(code {int(q.reshape(n, k)[ni, ki])}, scale {scales[ni, ki // g].item()!r}), "
                f"error {ratio[ni, ki].item():.3g} bf16 ulp; corrupt or mismatched log_scale?"
            )
        return cls._from_valid_codes(q.reshape(n, k).to(torch.int8), scales, bits, g)

    @classmethod
    def from_awq(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        group_size: int = 128,
        name: str = "?",
    ) -> QuantizedWeight:
        """Convert an AutoAWQ "GEMM" 4-bit weight (GRACE W4G128-AWQ) to our layout.

        ``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32 ``[K/G, N/8]`` (8 unsigned 4-bit values per
        word along N, column ``8c + AWQ_ORDER[i]`` at bits ``4i..4i+3`` of word c), ``scales``
        fp16 ``[K/G, N]``; ``W[n, k] = scales[k//G, n] * (code[k, n] - zero[k//G, n])``.
        Our format is symmetric, so every zero must be 8 (signed code = code - 8); anything
        else is refused rather than silently served with the wrong weights.
        """
        for tname, t in (("qweight", qweight), ("qzeros", qzeros)):
            if t.dtype != torch.int32 or t.dim() != 2:
                raise QuantizationError(
                    f"{name}: AWQ {tname} must be a 2-D int32 tensor, got {t.dtype} {list(t.shape)}"
                )
        if scales.dim() != 2 or not scales.dtype.is_floating_point:
            raise QuantizationError(
                f"{name}: AWQ scales must be a 2-D float tensor [K/G, N], got {scales.dtype} {list(scales.shape)}"
            )
        k, n_words = qweight.shape
        n = n_words * 8
        g = effective_group_size(k, group_size)
        ng = k // g
        if tuple(scales.shape) != (ng, n):
            raise QuantizationError(
                f"{name}: AWQ scales shape mismatch: qweight {list(qweight.shape)} implies K={k}, N={n}, "
                f"group size {g}, so scales must be [{ng}, {n}], got {list(scales.shape)}"
            )
        if tuple(qzeros.shape) != (ng, n_words):
            raise QuantizationError(
                f"{name}: AWQ qzeros shape mismatch: expected [{ng}, {n_words}], got {list(qzeros.shape)}"
            )

        zeros = _awq_unpack(qzeros)  # [K/G, N] unsigned
        bad = zeros != AWQ_SYMMETRIC_ZERO
        if bool(bad.any()):
            i = int(bad.flatten().nonzero()[0])
            gi, ni = _fmt_index(i, (ng, n))
            raise QuantizationError(
                f"{name}: AWQ weight is not symmetric: {int(bad.sum())} of {zeros.numel()} zero points "
                f"differ from {AWQ_SYMMETRIC_ZERO} (first at group {gi}, column {ni}: zero "
                f"{int(zeros[gi, ni])}); grace-serve supports only symmetric (zero = 8) AWQ checkpoints "
                f"such as GRACE W4G128-AWQ"
            )
        s = scales.detach().to(torch.float32).t().contiguous()  # [N, K/G]
        _check_scales(s, name)
        codes = (_awq_unpack(qweight) - AWQ_SYMMETRIC_ZERO).t().to(torch.int8)  # [N, K], -8..7
        return cls._from_valid_codes(codes, s, 4, g)

    def to_awq(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`from_awq` (4-bit only): ``(qweight int32 [K, N/8], qzeros, scales fp16)``.

        Used to write demo checkpoints in the AWQ format. Scales are rounded to fp16.
        """
        if self.bits != 4:
            raise ValueError(f"to_awq needs a 4-bit weight, got bits={self.bits}")
        if self.out_features % 8:
            raise ValueError(f"AWQ packing needs out_features % 8 == 0, got {self.out_features}")
        codes = (self.codes().to(torch.int32) + AWQ_SYMMETRIC_ZERO).t()  # [K, N] unsigned
        zeros = torch.full(
            (self.num_groups, self.out_features), AWQ_SYMMETRIC_ZERO, dtype=torch.int32, device=self.device
        )
        return _awq_pack(codes), _awq_pack(zeros), self.scales.t().to(torch.float16).contiguous()

    @staticmethod
    def cat(weights: list[QuantizedWeight]) -> QuantizedWeight:
        """Concatenate along N (fusing q/k/v or gate/up); bits, group size and K must agree."""
        if not weights:
            raise ValueError("cat needs at least one weight")
        first = weights[0]
        for w in weights[1:]:
            if (w.bits, w.group_size, w.in_features) != (first.bits, first.group_size, first.in_features):
                raise ValueError(
                    "cat needs equal bits/group_size/in_features, got "
                    f"{(first.bits, first.group_size, first.in_features)} and "
                    f"{(w.bits, w.group_size, w.in_features)}"
                )
        return QuantizedWeight(
            bits=first.bits,
            group_size=first.group_size,
            out_features=sum(w.out_features for w in weights),
            in_features=first.in_features,
            qweight=torch.cat([w.qweight for w in weights], dim=0),
            scales=torch.cat([w.scales for w in weights], dim=0),
            cache_dequantized=first.cache_dequantized,
        )


def _awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] AWQ-packed -> int32 [R, 8C] unsigned 4-bit values in natural column order."""
    r, c = packed.shape
    out = torch.empty((r, c, 8), dtype=torch.int32, device=packed.device)
    for i, col in enumerate(AWQ_ORDER):
        out[:, :, col] = (packed >> (4 * i)) & 0xF  # & 0xF also drops the arithmetic-shift sign bits
    return out.reshape(r, c * 8)


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_awq_unpack`: int [R, 8C] values 0..15 -> int32 [R, C]."""
    r, n = values.shape
    v = values.to(torch.int64).reshape(r, n // 8, 8)
    word = torch.zeros((r, n // 8), dtype=torch.int64, device=values.device)
    for i, col in enumerate(AWQ_ORDER):
        word |= (v[:, :, col] & 0xF) << (4 * i)
    # Reinterpret the low 32 bits as signed int32 (bit 31 set for nibble 7 >= 8).
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)


def quantize(w: torch.Tensor, bits: int = 8, group_size: int = 128, *, name: str = "?") -> QuantizedWeight:
    """Round-to-nearest symmetric quantization with ``scale = max|W| / qmax`` per group.

    qmax is 127 (8-bit) or 7 (4-bit), so codes lie in -qmax..qmax and ``|W - deq| <= s/2``.
    An all-zero group gets scale 1 (codes 0) instead of a 0 or NaN scale. This is *not* the
    QAT scale (used only when no sidecar is present, e.g. ``--quantization w8g128``).
    """
    _, qmax = _check_bits(bits)
    if w.dim() != 2:
        raise QuantizationError(f"{name}: weight must be 2-D [N, K], got shape {list(w.shape)}")
    n, k = w.shape
    g = effective_group_size(k, group_size)
    wf = w.detach().to(torch.float32)
    if not bool(torch.isfinite(wf).all()):
        i = int((~torch.isfinite(wf)).flatten().nonzero()[0])
        raise QuantizationError(f"{name}: non-finite weight at {_fmt_index(i, (n, k))}")
    w3 = wf.reshape(n, k // g, g)
    amax = w3.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.round(w3 / scales.unsqueeze(-1)).clamp_(-qmax, qmax)
    return QuantizedWeight._from_valid_codes(q.reshape(n, k).to(torch.int8), scales, bits, g)


def qmatmul(
    x: torch.Tensor,
    qw: QuantizedWeight,
    backend: str = "auto",
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ W^T (+ bias)`` for ``x [..., K]`` of any float dtype; returns ``x.dtype`` ``[..., N]``.

    ``backend``: "reference" (plain torch, kernels.reference), "triton" (kernels/qmatmul_triton.py:
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; fp16/bf16/fp32), or "auto": Triton
    for CUDA tensors of those dtypes, the reference otherwise. Unknown names raise ValueError.
    """
    kernel_backend.check(backend, "qmatmul")
    if x.shape[-1] != qw.in_features:
        raise ValueError(f"qmatmul: x has {x.shape[-1]} input features, weight expects {qw.in_features}")
    if kernel_backend.use_triton(x, backend):
        from kernels import qmatmul_triton  # local import: it imports this module, and triton

        return qmatmul_triton.qmatmul(x, qw, bias=bias)
    from kernels import reference  # local import: reference imports this module for typing only

    return reference.qmatmul(x, qw, bias=bias)
