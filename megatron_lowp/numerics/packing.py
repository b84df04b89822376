"""Bit packing of E2M1 (FP4) values: two 4-bit codes per uint8 byte, low nibble first.

A code is s eem: bit 3 the sign, bits 2..1 the exponent (bias 1), bit 0 the mantissa. Magnitude codes
0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6 in order; code 8 is -0. Element 2i of the last dim goes in the low
nibble of byte i and element 2i + 1 in the high nibble.
"""

from __future__ import annotations

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# 2 * magnitude (0, 1, 2, 3, 4, 6, 8, 12) -> magnitude code; unused slots never read.
_CODE_OF_TWICE = (0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7)


def e2m1_to_codes(q: torch.Tensor) -> torch.Tensor:
    """float32 values already on the E2M1 grid -> uint8 codes 0..15."""
    lut = torch.tensor(_CODE_OF_TWICE, dtype=torch.uint8, device=q.device)
    mag = lut[(q.abs() * 2).to(torch.int64)]
    return mag | (torch.signbit(q).to(torch.uint8) << 3)


def codes_to_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 -> float32 values (code 8 gives -0.0)."""
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    vals = mags[(codes & 7).to(torch.int64)]
    return torch.where((codes & 8) > 0, -vals, vals)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2n) uint8 codes -> (..., n) bytes."""
    if codes.shape[-1] % 2:
        raise ValueError("pack_fp4 needs an even last dimension")
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """(..., n) bytes -> (..., 2n) uint8 codes."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
