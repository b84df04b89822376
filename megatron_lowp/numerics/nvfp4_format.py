"""NVFP4: 16 E2M1 values share one E4M3 block scale, under one FP32 tensor scale (two-level scaling).

``scale_rounding="decode"`` (default; TransformerEngine and the hardware):

    S = 2688 / amax_tensor        (2688 = 448 * 6; "fixed": a given tensor_amax; "off": S = 1; amax 0 -> 1)
    d = E4M3_RN((blockmax / 6) * S)   the stored decode scale; e = S / d (0 when d == 0)
    q = E2M1(x * e)                   RN or SR, saturating at 6;    x_hat = (q * d) / S

``scale_rounding="encode"`` (the FP4 All the Way paper's simulation): t = amax / 2688, x' = |x| / t,
m = E4M3_RN(6 / blockmax(x')) stored, x_hat = sign(x) * (E2M1(x' * m) / m) * t. ``tile=True`` (2-D
weights): one scale per 16 x 16 tile, stored per 1 x 16 block. Blocks run along ``axis``; the formulas
and their edge cases are in blocks.py and docs/numerics.md. Storage: two E2M1 codes per byte (packing.py)
with the block axis last, float8_e4m3fn block scales, a float32 tensor scale.

Rounding the block scale to E4M3 can make d slightly smaller than blockmax / 6 * S; then the block's
largest element lands a little above 6 and saturates ("clipping", counted apart from overflow).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from megatron_lowp.numerics import blocks
from megatron_lowp.numerics.formats import E2M1, E4M3, FloatFormat
from megatron_lowp.numerics.number_format import (
    NumberFormat,
    QuantizedTensor,
    check_block_size,
    check_bool,
    stored_axis,
    uniforms,
)
from megatron_lowp.numerics.packing import codes_to_e2m1, e2m1_to_codes, pack_fp4, unpack_fp4
from megatron_lowp.numerics.sr_random import SRGenerator

_FP4_MAX_BYTE = 0x77  # two E2M1 codes 7 (= 6.0) in one byte


class NVFP4(NumberFormat):
    def __init__(self) -> None:
        super().__init__("nvfp4", E2M1.name, 16, "e4m3",
                         ("tensor_scale", "tensor_amax", "scale_rounding", "tile", "block_size"))

    def check_values(self, options: Mapping[str, Any]) -> None:
        blocks.check_tensor_scale(options.get("tensor_scale", "amax"), options.get("tensor_amax"),
                                  options.get("scale_rounding", "decode"))
        check_bool("tile", options.get("tile", False))
        check_block_size(self, options)

    def element_format(self, options: Mapping[str, Any]) -> FloatFormat:
        return E2M1

    def same_along_every_axis(self, options: Mapping[str, Any], rounding: str) -> bool:
        # a tile's scale is shared by its rows and its columns, and nearest rounding is element-wise
        return bool(options.get("tile", False)) and rounding == "nearest"

    def options_from_config(self, role: Mapping[str, Any], e4m3_max: float) -> dict[str, Any]:
        options = {"tensor_scale": role["tensor_scale"], "scale_rounding": role["scale_rounding"], "tile": role["tile"]}
        if role["tensor_scale"] == "fixed":
            options["tensor_amax"] = role["tensor_amax"] if role["tensor_amax"] is not None else 1.0
        return options

    # ---- the torch reference ----

    def _blocked(self, x32, rounding, axis, generator, options) -> tuple[blocks.Blocked, int, str]:
        bs = check_block_size(self, options)
        u = uniforms(x32, rounding, generator)
        xb = blocks.to_blocks(x32, axis, bs, self.name)
        ub = None if u is None else blocks.to_blocks(u, axis, bs, self.name)
        tile = options.get("tile", False)
        if tile:
            blocks.check_tile(x32.shape, axis, bs, self.name)
        scale_rounding = options.get("scale_rounding", "decode")
        ts = blocks.nvfp4_tensor_scale(x32, options.get("tensor_scale", "amax"), options.get("tensor_amax"),
                                       scale_rounding)
        return blocks.nvfp4_blocks(xb, ts, scale_rounding, rounding, ub, tile), bs, scale_rounding

    def quantize(self, x32: torch.Tensor, rounding: str, axis: int, generator: SRGenerator | None,
                 options: Mapping[str, Any], dtype: torch.dtype) -> QuantizedTensor:
        b, bs, scale_rounding = self._blocked(x32, rounding, axis, generator, options)
        data = pack_fp4(e2m1_to_codes(b.q.flatten(-2)))
        scale = b.scale.squeeze(-1).to(torch.float8_e4m3fn)
        return QuantizedTensor(self.name, data, scale, b.tensor_scale, x32.shape, stored_axis(x32, axis), dtype,
                               {"block_size": bs, "scale_rounding": scale_rounding})

    def fake_quantize(self, x32: torch.Tensor, rounding: str, axis: int, generator: SRGenerator | None,
                      options: Mapping[str, Any]) -> torch.Tensor:
        b, _, scale_rounding = self._blocked(x32, rounding, axis, generator, options)
        out = blocks.nvfp4_dequant(b.q, b.scale, b.tensor_scale, scale_rounding)
        return blocks.from_blocks(out, axis, x32.shape)

    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        q = codes_to_e2m1(unpack_fp4(qt.data))
        q = q.reshape(*q.shape[:-1], -1, qt.options["block_size"])
        s = qt.scale.to(torch.float32).unsqueeze(-1)
        out = blocks.nvfp4_dequant(q, s, qt.tensor_scale, qt.options["scale_rounding"])
        return blocks.from_blocks(out, qt.axis, qt.shape).to(dtype)

    # ---- stats ----

    def max_codes(self, qt: QuantizedTensor) -> QuantizedTensor:
        return QuantizedTensor(qt.fmt, torch.full_like(qt.data, _FP4_MAX_BYTE), qt.scale, qt.tensor_scale, qt.shape,
                               qt.axis, qt.dtype, qt.options)

    def range_top(self, qt: QuantizedTensor) -> torch.Tensor:
        # the largest block scale E4M3 stores: d = 448 (decode), or the smallest multiplier m = 2^-9 (encode)
        if qt.options["scale_rounding"] == "decode":
            return (E2M1.max_value * E4M3.max_value) / qt.tensor_scale
        return (E2M1.max_value / E4M3.min_subnormal) * qt.tensor_scale

    # ---- fused backends ----

    def fused_reason(self, backend: str, x: torch.Tensor, rounding: str, axis: int,
                     options: Mapping[str, Any]) -> str | None:
        from megatron_lowp.numerics import fused_dispatch

        reason = fused_dispatch.device_reason(backend, x)
        if reason is not None:
            return reason
        if options.get("scale_rounding", "decode") != "decode":
            return "only scale_rounding='decode' has a kernel"
        if backend == "triton":
            if options.get("tile", False) is not False:
                return "tile=True has no kernel"
            bs = options.get("block_size", 16)
            if bs & (bs - 1):
                return f"block_size={bs!r}: the kernel needs a power of two"
            if x.ndim == 0 or axis % x.ndim != x.ndim - 1:
                return "the kernel blocks along the last axis only"
            if x.shape[-1] % bs:
                return f"the last dimension ({x.shape[-1]}) is not a multiple of block_size={bs}"
        return None

    def quantize_fused(self, backend: str, x: torch.Tensor, rounding: str, axis: int,
                       generator: SRGenerator | None, options: Mapping[str, Any]) -> QuantizedTensor:
        from megatron_lowp.numerics import fused_dispatch

        bs = check_block_size(self, options)
        return fused_dispatch.nvfp4(backend, x, self, bs, rounding, axis, generator, options, codes=True)

    def fake_quantize_fused(self, backend: str, x: torch.Tensor, rounding: str, axis: int,
                            generator: SRGenerator | None, options: Mapping[str, Any]) -> torch.Tensor:
        from megatron_lowp.numerics import fused_dispatch

        bs = check_block_size(self, options)
        return fused_dispatch.nvfp4(backend, x, self, bs, rounding, axis, generator, options, codes=False)
