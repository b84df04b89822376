"""Quantized recipes: every linear a QuantizedLinear with the recipe's GemmSpecs, except the ones
kept in high precision (by glob over layer names, or the first/last N transformer blocks).

`recipe: custom` builds its GemmSpecs from the YAML's per-role sections (precision.x, .w, .dy, .w_t,
.dy_t, .x_t); the named paper recipes (fp8, fp4, ...) register their own specs on top of this class.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from megatron_lowp.config.schema import RoleConfig
from megatron_lowp.errors import UserError
from megatron_lowp.numerics import FORMATS
from megatron_lowp.precision.lifecycle import LifecycleSettings, QuantizedLifecycle
from megatron_lowp.precision.quantized_linear import QuantizedLinear
from megatron_lowp.precision.recipe import PrecisionRecipe, mlp_activation, register_recipe
from megatron_lowp.precision.spec import ROLES, GemmSpecs, QuantSpec

_BLOCK_INDEX = re.compile(r"^layers\.(\d+)\.")


def role_spec(role: RoleConfig, key: str = "precision.<role>", e4m3_max: float = 448.0) -> QuantSpec | None:
    """The QuantSpec a role section describes, with only the options its format understands.
    `e4m3_max` is the device's E4M3 maximum, used where the role's flavour is "device"."""
    if role.format is None:
        return None
    fmt = FORMATS[role.format]
    options = fmt.options_from_config(vars(role), e4m3_max)
    if role.amax == "delayed" and not fmt.per_tensor_fp8(options):
        raise UserError(f"{key}.amax: 'delayed' needs a per-tensor FP8 format (fp8_e4m3 or fp8_e5m2 with "
                        f"scaling: tensor), not {role.format} with scaling {role.scaling}")
    history = role.amax_history if role.amax == "delayed" else 0
    return QuantSpec(role.format, role.rounding, tuple(sorted(options.items())), amax_history=history)


@dataclass
class QuantizedRecipe(QuantizedLifecycle, PrecisionRecipe):
    """Every linear a QuantizedLinear with `specs`, except the ones kept in high precision; its
    lifecycle (QAF, monitors, telemetry, amax commits) comes from precision/lifecycle.py."""

    specs: GemmSpecs = field(default_factory=GemmSpecs)
    high_precision: tuple[str, ...] = ("lm_head",)
    first_blocks: int = 0
    last_blocks: int = 0
    n_layers: int = 0
    seed: int = 0
    backend: str = "emulated"
    settings: LifecycleSettings | None = None

    def __post_init__(self) -> None:
        self.init_lifecycle()

    def keeps_high_precision(self, name: str) -> bool:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.high_precision):
            return True
        match = _BLOCK_INDEX.match(name)
        if match:
            block = int(match.group(1))
            return block < self.first_blocks or block >= self.n_layers - self.last_blocks
        return False

    def make_linear(self, in_features: int, out_features: int, name: str) -> nn.Module:
        if self.keeps_high_precision(name) or not self.specs.quantizes_anything:
            return super().make_linear(in_features, out_features, name)
        return QuantizedLinear(in_features, out_features, self.specs, name=name, seed=self.seed, backend=self.backend)


def quantized_recipe(cfg, device, name: str, specs: GemmSpecs, cls: type[QuantizedRecipe] = QuantizedRecipe,
                     **extra) -> QuantizedRecipe:
    """A `cls` (QuantizedRecipe or a subclass with its own lifecycle) for the config; `extra` fills
    the subclass's own fields."""
    p = cfg.precision
    # torch implements _scaled_mm on the CPU too (a reference kernel, not a fast one), so "native"
    # is refused only on accelerators without FP8 tensor cores.
    if p.backend == "native" and not (device.capabilities.native_fp8_gemm or device.type == "cpu"):
        raise UserError(
            f"precision.backend: 'native' needs FP8 GEMM hardware (NVIDIA sm89+, Gaudi2+); "
            f"{device.capabilities.name} has none; use precision.backend=emulated"
        )
    dtype = torch.bfloat16 if p.autocast and device.supports_autocast(torch.bfloat16) else None
    return cls(
        name=name, autocast_dtype=dtype, mlp_activation=mlp_activation(p),
        specs=specs, high_precision=tuple(p.high_precision),
        first_blocks=p.high_precision_first_blocks, last_blocks=p.high_precision_last_blocks,
        n_layers=cfg.model.n_layers, seed=cfg.run.seed, backend=p.backend,
        settings=LifecycleSettings.from_config(cfg), **extra,
    )


def recipe_from_roles(cfg, device, cls: type[QuantizedRecipe] = QuantizedRecipe, **extra) -> QuantizedRecipe:
    """custom, and the named recipes whose package is YAML defaults (configs/precision/<name>.yaml)."""
    e4m3_max = device.capabilities.fp8_e4m3_max
    specs = GemmSpecs(**{role: role_spec(getattr(cfg.precision, role), f"precision.{role}", e4m3_max) for role in ROLES})
    return quantized_recipe(cfg, device, cfg.precision.recipe, specs, cls, **extra)


register_recipe("custom")(recipe_from_roles)
# Their roles, Smooth-SwiGLU, delayed scales, QAF ... are YAML defaults: configs/precision/<name>.yaml
register_recipe("fp8", needs_package=True)(recipe_from_roles)
register_recipe("fp4", needs_package=True)(recipe_from_roles)


@register_recipe("ngpt_fp4", needs_package=True)
def ngpt_fp4_recipe(cfg, device) -> QuantizedRecipe:
    """NVFP4 with fixed tensor scales: only sound on nGPT, whose forward operands are bounded by 1."""
    if cfg.model.arch != "ngpt":
        raise UserError(f"precision.recipe: 'ngpt_fp4' needs model.arch: ngpt (not {cfg.model.arch}): its fixed "
                        "NVFP4 tensor scale (amax = 1) is exact only for nGPT's unit-norm operands; use fp4 instead")
    if not cfg.model.ngpt_normalize_down_inputs:
        raise UserError("model.ngpt_normalize_down_inputs: false leaves the inputs of attn.out and mlp.down off the "
                        "unit sphere (amax 7.6-16 measured), and recipe 'ngpt_fp4' quantizes them with a fixed NVFP4 "
                        "tensor scale (amax = 1), which would clip them; keep it true, or use precision.recipe=fp4")
    return recipe_from_roles(cfg, device)
