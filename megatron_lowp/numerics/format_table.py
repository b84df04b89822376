"""The one table of number formats: name -> format object. A new format is one line here (an
instance of its family's class), or a new family class in its own file plus its line here.

| name     | family (file)                    | element | block | scale      |
|----------|----------------------------------|---------|-------|------------|
| fp8_e4m3 | TensorScaledFP8 (fp8_format.py)  | E4M3    | -     | FP32       |
| fp8_e5m2 | TensorScaledFP8 (fp8_format.py)  | E5M2    | -     | FP32       |
| nvfp4    | NVFP4 (nvfp4_format.py)          | E2M1    | 16    | E4M3, FP32 |
| mxfp4    | MXBlockFormat (mx_format.py)     | E2M1    | 32    | E8M0       |
| mxfp8    | MXBlockFormat (mx_format.py)     | E4M3    | 32    | E8M0       |
"""

from __future__ import annotations

from megatron_lowp.errors import UserError
from megatron_lowp.numerics.formats import E2M1, E4M3, E5M2
from megatron_lowp.numerics.fp8_format import TensorScaledFP8
from megatron_lowp.numerics.mx_format import MXBlockFormat
from megatron_lowp.numerics.number_format import NumberFormat
from megatron_lowp.numerics.nvfp4_format import NVFP4

FORMATS: dict[str, NumberFormat] = {f.name: f for f in (
    TensorScaledFP8("fp8_e4m3", E4M3, flavours=True),
    TensorScaledFP8("fp8_e5m2", E5M2, flavours=False),
    NVFP4(),
    MXBlockFormat("mxfp4", E2M1),
    MXBlockFormat("mxfp8", E4M3),
)}


def format_named(name: str) -> NumberFormat:
    """The format object called `name`; UserError listing the names otherwise."""
    if name not in FORMATS:
        raise UserError(f"fmt: {name!r} is not one of {', '.join(FORMATS)}")
    return FORMATS[name]
