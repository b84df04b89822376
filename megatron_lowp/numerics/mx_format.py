"""OCP Microscaling (MX v1.0): 32 elements share one power-of-two E8M0 scale: mxfp4 (E2M1), mxfp8 (E4M3).

    X = 2^clamp(floor(log2 blockmax) - emax_elem, -127, 127)   (emax_elem 2 for E2M1, 8 for E4M3)
    q = E(x / X)  RN or SR, saturating;   x_hat = q * X

blockmax / X lies in [4, 8) (E2M1) or [256, 512) (E4M3), past the element max 6 or 448: the OCP rule
rounds the scale down, so the top of a block may clip ("clipping" in stats.py, never overflow: scales
reach 2^127, beyond any float32). An all-zero block gets X = 2^-127 (E8M0 code 0). Storage: E8M0 codes
(uint8, biased by 127) per block; mxfp4 packs two E2M1 codes per byte, mxfp8 keeps float8_e4m3fn,
both with the block axis last. Matches torchao's ``to_mx`` (FLOOR) bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from megatron_lowp.numerics import blocks
from megatron_lowp.numerics.formats import E8M0_MAX_EXP, FloatFormat, e8m0_decode, e8m0_encode
from megatron_lowp.numerics.number_format import (
    NumberFormat,
    QuantizedTensor,
    check_block_size,
    stored_axis,
    uniforms,
)
from megatron_lowp.numerics.packing import codes_to_e2m1, e2m1_to_codes, pack_fp4, unpack_fp4
from megatron_lowp.numerics.sr_random import SRGenerator

_FP4_MAX_BYTE = 0x77  # two E2M1 codes 7 (= 6.0) in one byte


class MXBlockFormat(NumberFormat):
    def __init__(self, name: str, element: FloatFormat, block_size: int = 32) -> None:
        super().__init__(name, element.name, block_size, "e8m0", ("block_size",))
        self.elem = element
        self.packed_fp4 = element.exp_bits + element.man_bits == 3  # 4-bit elements, two per byte

    def check_values(self, options: Mapping[str, Any]) -> None:
        check_block_size(self, options)

    def element_format(self, options: Mapping[str, Any]) -> FloatFormat:
        return self.elem

    # ---- the torch reference ----

    def _blocked(self, x32, rounding, axis, generator, options) -> tuple[blocks.Blocked, torch.Tensor, int]:
        bs = check_block_size(self, options)
        u = uniforms(x32, rounding, generator)
        xb = blocks.to_blocks(x32, axis, bs, self.name)
        ub = None if u is None else blocks.to_blocks(u, axis, bs, self.name)
        b, exp = blocks.mx_blocks(xb, self.elem, rounding, ub)
        return b, exp, bs

    def quantize(self, x32: torch.Tensor, rounding: str, axis: int, generator: SRGenerator | None,
                 options: Mapping[str, Any], dtype: torch.dtype) -> QuantizedTensor:
        b, exp, bs = self._blocked(x32, rounding, axis, generator, options)
        flat = b.q.flatten(-2)
        data = pack_fp4(e2m1_to_codes(flat)) if self.packed_fp4 else flat.to(torch.float8_e4m3fn)
        return QuantizedTensor(self.name, data, e8m0_encode(exp.squeeze(-1)), None, x32.shape,
                               stored_axis(x32, axis), dtype, {"block_size": bs})

    def fake_quantize(self, x32: torch.Tensor, rounding: str, axis: int, generator: SRGenerator | None,
                      options: Mapping[str, Any]) -> torch.Tensor:
        b, _, _ = self._blocked(x32, rounding, axis, generator, options)
        return blocks.from_blocks(blocks.mx_dequant(b.q, b.scale), axis, x32.shape)

    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        q = codes_to_e2m1(unpack_fp4(qt.data)) if self.packed_fp4 else qt.data.to(torch.float32)
        q = q.reshape(*q.shape[:-1], -1, qt.options["block_size"])
        out = blocks.mx_dequant(q, e8m0_decode(qt.scale).unsqueeze(-1))
        return blocks.from_blocks(out, qt.axis, qt.shape).to(dtype)

    # ---- stats ----

    def max_codes(self, qt: QuantizedTensor) -> QuantizedTensor:
        top = _FP4_MAX_BYTE if self.packed_fp4 else self.elem.max_value
        return QuantizedTensor(qt.fmt, torch.full_like(qt.data, top), qt.scale, qt.tensor_scale, qt.shape, qt.axis,
                               qt.dtype, qt.options)

    def range_top(self, qt: QuantizedTensor) -> torch.Tensor:
        # max * 2^127 is past float32's range (inf): no finite element overflows an MX format
        return torch.tensor(self.elem.max_value * 2.0**E8M0_MAX_EXP, dtype=torch.float32, device=qt.data.device)
