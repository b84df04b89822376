"""One quantization serving two GEMMs (precision/quantized_linear.py, `shares_quantization`).

Per-tensor FP8 with round-to-nearest gives the same values along either axis, so Q(X) serves fprop
and wgrad; NVFP4 with 16 x 16 weight tiles gives W's tile scales to its rows and its columns, so Q(W)
serves fprop and dgrad. The shared path must quantize each such operand once and give the outputs
and gradients of quantizing it twice, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from megatron_lowp.numerics import quantize
from megatron_lowp.precision import GemmSpecs, QuantizedLinear, QuantSpec
from megatron_lowp.precision import quantized_linear as ql

E4 = QuantSpec("fp8_e4m3", options=(("power_of_two", True),))
TILE = QuantSpec("nvfp4", options=(("tile", True),))
NV_SR = QuantSpec("nvfp4", "stochastic")


def run(specs: GemmSpecs, share: bool, monkeypatch) -> tuple[list[torch.Tensor], list[str]]:
    """(y, dx, dw) of one forward + backward, and the roles quantized (sharing on or forced off)."""
    calls: list[str] = []
    real = ql.RoleQuantizer.packed
    monkeypatch.setattr(ql.RoleQuantizer, "packed", lambda self, role, t: calls.append(role) or real(self, role, t))
    real_fake = ql.RoleQuantizer.fake
    monkeypatch.setattr(ql.RoleQuantizer, "fake", lambda self, role, t, d: calls.append(role) or real_fake(self, role, t, d))
    if not share:
        monkeypatch.setattr(ql, "shares_quantization", lambda a, b: False)
    torch.manual_seed(0)
    layer = QuantizedLinear(64, 48, specs, name="layers.0.mlp.up")
    x = (torch.randn(4, 16, 64) * torch.linspace(0.1, 30, 64)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().sum().backward()
    monkeypatch.undo()
    return [y.detach(), x.grad, layer.weight.grad], sorted(calls)


@pytest.mark.parametrize("specs,once", [
    (GemmSpecs(x=E4, w=E4, dy=QuantSpec("fp8_e5m2", "stochastic"), w_t=QuantSpec("fp8_e5m2"), dy_t=E4, x_t=E4), "x"),
    (GemmSpecs(x=NV_SR, w=TILE, dy=NV_SR, w_t=TILE, dy_t=NV_SR, x_t=NV_SR), "w"),
])
def test_shared_quantization_equals_two_quantizations(specs, once, monkeypatch):
    shared, calls_shared = run(specs, True, monkeypatch)
    twice, calls_twice = run(specs, False, monkeypatch)
    for a, b in zip(shared, twice, strict=True):
        assert torch.equal(a, b)
    assert calls_twice.count(once) == 1 and calls_shared.count(once) == 1
    assert len(calls_shared) == len(calls_twice) - 1  # the transposed role was not quantized again


def test_reuse_only_where_values_do_not_depend_on_the_axis():
    assert ql.shares_quantization(E4, E4) and ql.shares_quantization(TILE, TILE)
    assert not ql.shares_quantization(QuantSpec("nvfp4"), QuantSpec("nvfp4"))  # 1 x 16 blocks: axis matters
    assert not ql.shares_quantization(NV_SR, NV_SR)  # SR draws noise per role
    assert not ql.shares_quantization(QuantSpec("fp8_e4m3", amax_history=2), QuantSpec("fp8_e4m3", amax_history=2))
    assert not ql.shares_quantization(E4, QuantSpec("fp8_e5m2"))
    w = torch.randn(32, 48)  # the premise, checked on the format: tiles and per-tensor FP8 along both axes
    for fmt, opts in (("nvfp4", {"tile": True}), ("fp8_e4m3", {})):
        a = quantize(w, fmt, axis=-1, backend="torch", **opts).dequantize()
        b = quantize(w, fmt, axis=0, backend="torch", **opts).dequantize()
        assert torch.equal(a, b)
