"""Where a training step's time goes, per recipe: torch.profiler over a few steps, attributed to
named parts of the library (CPU op self time, plus the Python time inside each named range).

    OMP_NUM_THREADS=1 python scripts/profile_train.py recipes/tiny/bf16.yaml --recipes bf16 fp8 fp4 \\
        --steps 2 [--out bench/profile] [--top 15] [override ...]

The library is not changed: this process wraps a few functions in `record_function` ranges
(quantization per GEMM role, dequantization of saved operands, delayed scaling's amax observations,
SR uniforms, attention, the optimizer step, the recipe's hooks, the quantized linear's forward, dgrad
and wgrad). Use --warmup 3 or more for delayed-scaling recipes (fp8): their second step is the first
with given scales, which compiles the fused quantizers' given-scale graphs. Each op's self time goes to the innermost range around it;
time outside every range is split by op name (GEMMs, other ops); "python" is the wall time no op
or range accounts for (the interpreter between ops). Prints one table per recipe and the top ops by
self time; writes profile_train.json and profile_train.md into --out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from scripts.bench_train import build, parse_variants, timed_steps  # noqa: E402

PREFIX = "lowp::"
GEMM = re.compile(r"^aten::(mm|addmm|bmm|matmul|_scaled_mm|linear)$")


def _ranged(fn, name_of):
    def wrapper(*args, **kwargs):
        with record_function(PREFIX + name_of(*args, **kwargs)):
            return fn(*args, **kwargs)
    wrapper.__wrapped__ = fn
    return wrapper


def annotate_library() -> None:
    """Wrap the library's parts in named ranges (in this process only)."""
    from megatron_lowp.numerics import QuantizedTensor
    from megatron_lowp.numerics.sr_random import SRGenerator
    from megatron_lowp.precision import quantized_linear as ql
    from megatron_lowp.precision.delayed import DelayedScaling
    from megatron_lowp.precision.lifecycle import QuantizedLifecycle

    rq = ql.RoleQuantizer
    rq.fake = _ranged(rq.fake, lambda self, role, *a, **k: f"quantize.{role}")
    rq.packed = _ranged(rq.packed, lambda self, role, *a, **k: f"quantize.{role}")
    rq._record = _ranged(rq._record, lambda *a, **k: "telemetry")
    # backward restoring a saved operand (x_t, w_t) to the compute dtype, and delayed scaling's amax reads
    QuantizedTensor.dequantize = _ranged(QuantizedTensor.dequantize, lambda self, *a, **k: f"dequantize.{self.fmt}")
    DelayedScaling.observe = _ranged(DelayedScaling.observe, lambda *a, **k: "amax_observe")
    SRGenerator.uniform = _ranged(SRGenerator.uniform, lambda *a, **k: "sr_uniform")
    F.scaled_dot_product_attention = _ranged(F.scaled_dot_product_attention, lambda *a, **k: "attention")
    ql._dgrad = _ranged(ql._dgrad, lambda *a, **k: "qlinear.dgrad")
    ql._wgrad = _ranged(ql._wgrad, lambda *a, **k: "qlinear.wgrad")
    fn = ql.QuantizedLinearFunction
    fn.forward = staticmethod(_ranged(fn.forward, lambda *a, **k: "qlinear.forward"))
    for hook in ("before_step", "after_backward", "after_optimizer_step"):
        setattr(QuantizedLifecycle, hook, _ranged(getattr(QuantizedLifecycle, hook), lambda *a, h=hook, **k: f"recipe.{h}"))


def _range_of(event) -> str | None:
    node = event
    while node is not None:
        if node.name.startswith(PREFIX):
            return node.name[len(PREFIX):]
        node = getattr(node, "cpu_parent", None)
    return None


def attribute(events, wall_s: float, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """(seconds per step by part, seconds per step by op name) from the profile's CPU events."""
    parts: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith("ProfilerStep"):
            continue
        self_s = e.self_cpu_time_total / 1e6 / steps
        part = _range_of(e)
        if part is None:
            part = "gemm (outside ranges)" if GEMM.match(e.name) else "other ops"
        parts[part] += self_s
        if not e.name.startswith(PREFIX):
            ops[e.name] += self_s
    parts["python (between ops)"] = max(0.0, wall_s / steps - sum(parts.values()))
    return dict(parts), dict(ops)


def markdown(label: str, step_s: float, parts: dict[str, float], ops: dict[str, float], top: int) -> str:
    lines = [f"### {label}: {step_s:.3f} s per step", "", "| part | s/step | share |", "|---|---|---|"]
    for name, s in sorted(parts.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {s:.3f} | {100 * s / step_s:.1f}% |")
    lines += ["", f"Top {top} ops by self time:", "", "| op | s/step | share |", "|---|---|---|"]
    for name, s in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {name} | {s:.3f} | {100 * s / step_s:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe_file", type=Path)
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every recipe")
    parser.add_argument("--recipes", nargs="+", default=["bf16", "fp8", "fp4"], help="RECIPE or LABEL=RECIPE")
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("LABEL", "KEY=VALUE"), dest="sets")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path("bench") / time.strftime("profile-%Y%m%d-%H%M%S")
    annotate_library()
    rows, text = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (recipe, own) in parse_variants(args.recipes, args.sets).items():
            trainer = build(args.recipe_file, label, recipe, [*args.overrides, *own], tmp)
            trainer.engine.step = _ranged(trainer.engine.step, lambda *a, **k: "optimizer")
            timed_steps(trainer, args.warmup)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step_s = timed_steps(trainer, args.steps)
            parts, ops = attribute(prof.events(), step_s * args.steps, args.steps)
            text.append(markdown(label, step_s, parts, ops, args.top))
            print(text[-1], flush=True)
            rows.append({"label": label, "recipe": recipe, "step_s": step_s, "parts_s": parts, "ops_s": ops,
                         "overrides": [*args.overrides, *own]})
            del trainer, prof
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_train.json").write_text(json.dumps(rows, indent=1))
    (out / "profile_train.md").write_text("\n".join(text))
    print(f"wrote {out}/profile_train.json and profile_train.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
