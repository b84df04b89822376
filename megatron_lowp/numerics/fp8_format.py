"""FP8 with one FP32 scale per tensor or per channel: fp8_e4m3, fp8_e5m2.

    q = E(x * s) (round-to-nearest-even or stochastic, saturating at the element max),  x_hat = q / s

``scaling="tensor"``: one s = max / amax(|x|); ``"channel"``: one s per slice along ``axis`` (amax over
that axis, kept as size 1). ``power_of_two=True``: s = 2^floor(log2(max / amax)), exact from the binary
exponents, so amax * s <= max always. ``scale=`` uses a given scale (delayed scaling) as is. amax = 0
gives s = 1. E4M3 comes in two ``flavour``s: "ocp" (max 448) and "gaudi2" (max 240, a subset of the
e4m3fn grid); E5M2 has max 57344. The bytes are torch float8 tensors in x's shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from megatron_lowp.errors import UserError
from megatron_lowp.numerics import blocks
from megatron_lowp.numerics.formats import E4M3_FLAVOURS, TORCH_DTYPES, FloatFormat, e4m3_flavour
from megatron_lowp.numerics.number_format import (
    NumberFormat,
    QuantizedTensor,
    check_bool,
    check_choice,
    stored_axis,
    uniforms,
)
from megatron_lowp.numerics.rounding import round_to_format
from megatron_lowp.numerics.scaling import amax, scale_from_amax
from megatron_lowp.numerics.sr_random import SRGenerator

FP8_SCALINGS = ("tensor", "channel")


class TensorScaledFP8(NumberFormat):
    """An FP8 element format under an FP32 scale per tensor (or channel)."""

    def __init__(self, name: str, element: FloatFormat, flavours: bool) -> None:
        options = ("scaling", "power_of_two", "scale", *(("flavour",) if flavours else ()))
        super().__init__(name, element.name, None, "fp32", options)
        self.default_element = element
        self.flavours = flavours  # E4M3: "ocp" or "gaudi2"

    def check_values(self, options: Mapping[str, Any]) -> None:
        check_choice("scaling", options.get("scaling", "tensor"), FP8_SCALINGS)
        check_bool("power_of_two", options.get("power_of_two", False))
        if self.flavours:
            e4m3_flavour(options.get("flavour", "ocp"))

    def element_format(self, options: Mapping[str, Any]) -> FloatFormat:
        return e4m3_flavour(options.get("flavour", "ocp")) if self.flavours else self.default_element

    def per_tensor_fp8(self, options: Mapping[str, Any]) -> bool:
        scale = options.get("scale")
        if scale is not None:
            return torch.as_tensor(scale).numel() == 1
        return options.get("scaling", "tensor") == "tensor"

    def same_along_every_axis(self, options: Mapping[str, Any], rounding: str) -> bool:
        # one scale for all elements: the axis only names the GEMM; SR would draw other noise
        return self.per_tensor_fp8(options) and rounding == "nearest"

    def options_from_config(self, role: Mapping[str, Any], e4m3_max: float) -> dict[str, Any]:
        options = {"scaling": role["scaling"], "power_of_two": role["power_of_two"]}
        if self.flavours:
            flavour = role["flavour"]
            if flavour == "device":  # the variant the device computes in
                flavour = "gaudi2" if e4m3_max == E4M3_FLAVOURS["gaudi2"].max_value else "ocp"
            options["flavour"] = flavour
        return options

    # ---- the torch reference ----

    def given_scale(self, options: Mapping[str, Any], device: torch.device) -> torch.Tensor | None:
        """The scale= option as a float32 tensor (checked positive and finite), or None."""
        given = options.get("scale")
        if given is None:
            return None
        s = torch.as_tensor(given, dtype=torch.float32, device=device)
        if not bool(torch.isfinite(s).all() and (s > 0).all()):
            raise UserError("scale: must be positive and finite")
        return s

    def scale(self, x32: torch.Tensor, axis: int, options: Mapping[str, Any]) -> torch.Tensor:
        """The multiplicative scale: given, or from the current amax (per tensor or per channel)."""
        s = self.given_scale(options, x32.device)
        if s is not None:
            try:
                torch.broadcast_shapes(s.shape, x32.shape)
            except RuntimeError:
                raise UserError(
                    f"scale: shape {tuple(s.shape)} does not broadcast to x's shape {tuple(x32.shape)}"
                ) from None
            return s
        power_of_two = options.get("power_of_two", False)
        if options.get("scaling", "tensor") == "channel":
            ax = blocks.normalize_axis(axis, x32.ndim, "channel scaling") if x32.ndim else None
            return scale_from_amax(amax(x32, ax), self.element_format(options).max_value, power_of_two)
        return scale_from_amax(amax(x32), self.element_format(options).max_value, power_of_two)

    def _values(self, x32, rounding, axis, generator, options) -> tuple[torch.Tensor, torch.Tensor]:
        elem = self.element_format(options)
        s = self.scale(x32, axis, options)
        return round_to_format(x32 * s, elem, rounding, uniforms(x32, rounding, generator)), s

    def quantize(self, x32: torch.Tensor, rounding: str, axis: int, generator: SRGenerator | None,
                 options: Mapping[str, Any], dtype: torch.dtype) -> QuantizedTensor:
        q, s = self._values(x32, rounding, axis, generator, options)
        elem = self.element_format(options)
        return QuantizedTensor(self.name, q.to(TORCH_DTYPES[elem.name]), s, None, x32.shape,
                               stored_axis(x32, axis), dtype, {"element": elem.name})

    def fake_quantize(self, x32: torch.Tensor, rounding: str, axis: int, generator: SRGenerator | None,
                      options: Mapping[str, Any]) -> torch.Tensor:
        q, s = self._values(x32, rounding, axis, generator, options)
        return q / s

    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        return (qt.data.to(torch.float32) / qt.scale).to(dtype)

    # ---- stats ----

    def _max_value(self, qt: QuantizedTensor) -> float:
        # the float8 dtype's own max is the format's max, except Gaudi2's E4M3 (240 in an e4m3fn byte)
        if qt.options.get("element") == "e4m3_gaudi2":
            return e4m3_flavour("gaudi2").max_value
        return torch.finfo(qt.data.dtype).max

    def max_codes(self, qt: QuantizedTensor) -> QuantizedTensor:
        return QuantizedTensor(qt.fmt, torch.full_like(qt.data, self._max_value(qt)), qt.scale, qt.tensor_scale,
                               qt.shape, qt.axis, qt.dtype, qt.options)

    def range_top(self, qt: QuantizedTensor) -> torch.Tensor:
        # no block scale to round: past max / s is past what this recipe's scale can hold
        return torch.tensor(self._max_value(qt), dtype=torch.float32, device=qt.scale.device) / qt.scale

    # ---- fused backends ----

    def fused_reason(self, backend: str, x: torch.Tensor, rounding: str, axis: int,
                     options: Mapping[str, Any]) -> str | None:
        from megatron_lowp.numerics import fused_dispatch

        reason = fused_dispatch.device_reason(backend, x)
        if reason is None and not self.per_tensor_fp8(options):
            reason = ("only a per-tensor (single) scale has a kernel" if options.get("scale") is not None
                      else "only scaling='tensor' has a kernel (channel scaling runs in torch)")
        return reason

    def quantize_fused(self, backend: str, x: torch.Tensor, rounding: str, axis: int,
                       generator: SRGenerator | None, options: Mapping[str, Any]) -> QuantizedTensor:
        from megatron_lowp.numerics import fused_dispatch

        elem = self.element_format(options)
        data, s = fused_dispatch.fp8(backend, x, self, elem, rounding, axis, generator, options, codes=True)
        return QuantizedTensor(self.name, data, s, None, x.shape, stored_axis(x, axis), x.dtype,
                               {"element": elem.name})

    def fake_quantize_fused(self, backend: str, x: torch.Tensor, rounding: str, axis: int,
                            generator: SRGenerator | None, options: Mapping[str, Any]) -> torch.Tensor:
        from megatron_lowp.numerics import fused_dispatch

        if backend != "inductor":
            return super().fake_quantize_fused(backend, x, rounding, axis, generator, options)
        elem = self.element_format(options)
        out, _ = fused_dispatch.fp8(backend, x, self, elem, rounding, axis, generator, options, codes=False)
        return out
