"""Block-scaled 4/8-bit formats: NVFP4 and OCP MX (MXFP4, MXFP8), blocks along one axis.

Blocks are ``block_size`` consecutive elements along ``axis`` (the GEMM contraction dim), which must
divide that dim. Everything is computed in float32; results are returned blocked, shape
(..., n_blocks, block_size) with the block axis moved last.

NVFP4 (16 x E2M1, E4M3 block scale, FP32 tensor scale); ``scale_rounding="decode"`` (default, the
hardware / TransformerEngine convention):
    S = 448 * 6 / amax_tensor            (1 if amax is 0; "fixed" uses a given amax; "off": S = 1)
    d = E4M3_RN((blockmax / 6) * S)      decode scale, stored; saturates at 448
    e = S / d                            (0 when d == 0: the block is all zero after scaling)
    q = E2M1(x * e)                      RN or SR, saturating at 6;   x_hat = (q * d) / S
``scale_rounding="encode"`` (the FP4 All the Way paper's convention):
    t = amax_tensor / (6 * 448)          (1 if amax is 0 or tensor_scale="off"); x' = |x| / t
    m = E4M3_RN(6 / blockmax(x'))        encode multiplier, stored; 1 where non-finite or 0
    q = E2M1(x' * m);                    x_hat = sign(x) * (q / m) * t
``tile=True`` (2-D only): one scale per 16 x 16 tile; scales are still stored one per 1 x 16 block
(repeated down the tile), the layout block-scaled GEMMs read.

MX (OCP Microscaling v1.0): 32 elements share an E8M0 scale X = 2^(floor(log2(blockmax)) - emax_elem),
emax_elem = 2 for E2M1 (MXFP4) and 8 for E4M3 (MXFP8); the exponent is clamped to [-127, 127].
Elements x / X are rounded with saturation (blockmax / X lies in [4, 8) or [256, 512), so the top of
the block may clip to 6 or 448). An all-zero block gets X = 2^-127 (E8M0 code 0), what the formula
gives with floor(log2(0)) = -inf after the clamp. x_hat = q * X.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_lowp.errors import UserError
from megatron_lowp.numerics import scaling
from megatron_lowp.numerics.formats import E2M1, E4M3, E8M0_MAX_EXP, E8M0_MIN_EXP, FloatFormat
from megatron_lowp.numerics.rounding import round_to_format

NVFP4_GLOBAL = E4M3.max_value * E2M1.max_value  # 2688: amax_tensor maps to the top of both levels
TENSOR_SCALES = ("amax", "fixed", "off")
SCALE_ROUNDINGS = ("decode", "encode")
MX_ELEMENTS: dict[str, FloatFormat] = {"mxfp4": E2M1, "mxfp8": E4M3}


@dataclass
class Blocked:
    """A block-quantized tensor in float32: grid values q, one scale per block, one tensor scale."""

    q: torch.Tensor  # (..., n_blocks, block_size), values on the element grid
    scale: torch.Tensor  # (..., n_blocks, 1): d (nvfp4 decode), m (nvfp4 encode) or X (mx)
    tensor_scale: torch.Tensor  # scalar: S (nvfp4 decode), t (nvfp4 encode); 1 for mx


def normalize_axis(axis: int, ndim: int, fmt: str) -> int:
    if not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise UserError(f"{fmt}: axis={axis!r} is out of range for a {ndim}-D tensor (allowed {-ndim}..{ndim - 1})")
    return axis % ndim


def check_block_axis(shape: torch.Size, axis: int, block_size: int, fmt: str) -> int:
    """The normalized block axis; UserError unless block_size divides its size."""
    if len(shape) == 0:
        raise UserError(f"{fmt}: x must have at least one dimension to form blocks")
    ax = normalize_axis(axis, len(shape), fmt)
    n = shape[ax]
    if n % block_size != 0:
        raise UserError(
            f"{fmt}: block size {block_size} does not divide dimension {ax} (size {n}); "
            f"blocks run along axis={axis}, so that size must be a multiple of {block_size}"
        )
    return ax


def check_tile(shape: torch.Size, axis: int, block_size: int, fmt: str) -> None:
    """UserError unless x is 2-D and its other dimension (not the block axis) is a multiple of block_size."""
    if len(shape) != 2:
        raise UserError(f"{fmt}: tile=True needs a 2-D tensor (a weight), got {len(shape)}-D")
    rows = shape[1 - axis % 2]
    if rows % block_size != 0:
        raise UserError(
            f"{fmt}: tile=True needs the other dimension (size {rows}) to be a multiple of the block size {block_size}"
        )


def to_blocks(x: torch.Tensor, axis: int, block_size: int, fmt: str) -> torch.Tensor:
    """Move axis last and split it into (n_blocks, block_size); the size must divide."""
    ax = check_block_axis(x.shape, axis, block_size, fmt)
    xm = x.movedim(ax, -1)
    return xm.reshape(*xm.shape[:-1], x.shape[ax] // block_size, block_size)


def from_blocks(xb: torch.Tensor, axis: int, shape: torch.Size) -> torch.Tensor:
    """Inverse of to_blocks."""
    ax = axis % len(shape)
    xm = xb.reshape(*xb.shape[:-2], xb.shape[-2] * xb.shape[-1])
    return xm.movedim(-1, ax).reshape(shape)


def _block_amax(xb: torch.Tensor, tile: bool) -> torch.Tensor:
    """max |x| per block (..., n_blocks, 1); with tile (xb from a 2-D x that passed check_tile), per
    block_size x block_size tile, repeated per row."""
    a = xb.abs().amax(dim=-1, keepdim=True)
    if not tile:
        return a
    rows, nb, bs = xb.shape
    tiles = a.reshape(rows // bs, bs, nb, 1).amax(dim=1, keepdim=True)
    return tiles.expand(rows // bs, bs, nb, 1).reshape(rows, nb, 1)


def check_tensor_scale(tensor_scale: str, tensor_amax: float | None, scale_rounding: str) -> None:
    if tensor_scale not in TENSOR_SCALES:
        raise UserError(f"tensor_scale: {tensor_scale!r} is not one of {', '.join(TENSOR_SCALES)}")
    if scale_rounding not in SCALE_ROUNDINGS:
        raise UserError(f"scale_rounding: {scale_rounding!r} is not one of {', '.join(SCALE_ROUNDINGS)}")
    if tensor_scale == "fixed":
        if not isinstance(tensor_amax, (int, float)) or not 0 < tensor_amax < float("inf"):
            raise UserError(f"tensor_amax: {tensor_amax!r} must be a positive finite number with tensor_scale='fixed'")
    elif tensor_amax is not None:
        raise UserError("tensor_amax: only allowed with tensor_scale='fixed'")


def nvfp4_tensor_scale(
    x: torch.Tensor, tensor_scale: str, tensor_amax: float | None, scale_rounding: str,
    x_amax: torch.Tensor | None = None,
) -> torch.Tensor:
    """S (decode convention: multiply to encode) or t (encode convention: divide to encode); x_amax is
    amax(|x|) when the caller has it already."""
    check_tensor_scale(tensor_scale, tensor_amax, scale_rounding)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    if tensor_scale == "off":
        return one
    if tensor_scale == "fixed":
        amax = torch.tensor(float(tensor_amax), dtype=torch.float32, device=x.device)
    else:
        amax = scaling.amax(x) if x_amax is None else x_amax
    if scale_rounding == "decode":
        s = torch.clamp(NVFP4_GLOBAL / amax, max=torch.finfo(torch.float32).max)
    else:
        s = amax / NVFP4_GLOBAL
    return torch.where((amax > 0) & (s > 0), s, one)


def nvfp4_blocks(
    xb: torch.Tensor,
    tensor_scale: torch.Tensor,
    scale_rounding: str,
    rounding: str,
    u: torch.Tensor | None,
    tile: bool = False,
) -> Blocked:
    """Quantize float32 blocks (..., n_blocks, 16) to NVFP4 (values, E4M3 scale per block, tensor scale)."""
    if scale_rounding == "decode":
        S = tensor_scale
        d = round_to_format((_block_amax(xb, tile) / E2M1.max_value) * S, E4M3)
        e = torch.where(d > 0, S / d, torch.zeros_like(d))
        q = round_to_format(xb * e, E2M1, rounding, u)
        return Blocked(q, d, S)
    t = tensor_scale
    xs = xb.abs() / t
    m = round_to_format(E2M1.max_value / _block_amax(xs, tile), E4M3)  # inf -> 448 by saturation
    m = torch.where(torch.isfinite(m) & (m > 0) & (_block_amax(xs, tile) > 0), m, torch.ones_like(m))
    q = round_to_format(torch.copysign(xs * m, xb), E2M1, rounding, u)
    return Blocked(q, m, t)


def nvfp4_dequant(
    q: torch.Tensor, scale: torch.Tensor, tensor_scale: torch.Tensor, scale_rounding: str
) -> torch.Tensor:
    if scale_rounding == "decode":
        return (q * scale) / tensor_scale
    return (q / scale) * tensor_scale


def mx_blocks(
    xb: torch.Tensor, elem: FloatFormat, rounding: str, u: torch.Tensor | None
) -> tuple[Blocked, torch.Tensor]:
    """Quantize float32 blocks to MX: returns the values/scales and the integer scale exponents."""
    bmax = xb.abs().amax(dim=-1, keepdim=True)
    _, e = torch.frexp(bmax)  # bmax = m * 2^e, m in [0.5, 1): floor(log2 bmax) = e - 1; bmax = 0 gives e = 0
    e = torch.where(bmax > 0, e.to(torch.int32) - 1, torch.full_like(e, E8M0_MIN_EXP, dtype=torch.int32))
    exp = torch.clamp(e - elem.emax, E8M0_MIN_EXP, E8M0_MAX_EXP)
    X = torch.exp2(exp.to(torch.float64)).to(torch.float32)  # exact, incl. 2^-127 (subnormal)
    q = round_to_format(xb / X, elem, rounding, u)
    return Blocked(q, X, torch.ones((), dtype=torch.float32, device=xb.device)), exp


def mx_dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q * scale
