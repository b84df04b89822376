"""Benchmark the numerics: quantizer throughput per format and rounding, and the quantized linear's
forward+backward time against nn.Linear, on one device. Prints tables and writes JSON.

    python scripts/bench_numerics.py [--device auto|cpu|cuda|hpu] [--elements N] [--sizes 4096x4096x4096 ...]
        [--shapes 4096x256 4096x704 ...] [--dtype float32] [--threads N] [--profile] [--out FILE.json]

Quantizer bandwidth counts the bytes read (input) and written (output of the same dtype, as
fake_quantize returns) and is compared with a plain device-to-device copy of the same tensor,
measured in the same run: the copy is the ceiling a memory-bound kernel can reach. Where the fused
Triton kernels run, a second table times them alone (scales given, as delayed scaling gives them):
bytes read (the BF16 input) plus bytes written (FP8 codes, or packed E2M1 codes and E4M3 block scales).

The operand table times each quantizer at the shapes of GEMM operands (--shapes, --dtype), on the
torch reference and on the fused path ``backend="auto"`` picks (inductor on the CPU, Triton on CUDA),
as a share of a copy of the same tensor timed alternately with it, repeat by repeat: fake_quantize
(read x, write x's dtype; what emulated GEMMs consume), quantize (read x, write the packed codes and
scales) and dequantize (read the packed form, write x's dtype: what backward does with a saved
operand; auto = inductor on the CPU, except E5M2 whose torch cast is faster). --profile
prints torch.profiler's operator table for one NVFP4 and one FP8 fake_quantize, reference and fused.
Timings are medians over --repeats (the best repeat is kept too: on a shared machine it is the one
least disturbed).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_lowp.device import get_device  # noqa: E402
from megatron_lowp.numerics import FORMATS, SRGenerator, fake_quantize, quantize  # noqa: E402
from megatron_lowp.precision import GemmSpecs, QuantizedLinear, QuantSpec  # noqa: E402


def timed(fn, device, repeats: int, warmup: int = 2, min_seconds: float = 0.005) -> float:
    """Median seconds of fn() over repeats, after warmup calls, with the device synchronized. A
    repeat runs fn enough times back to back to last min_seconds, so that one synchronize's latency
    does not count against a kernel of a few microseconds."""
    for _ in range(warmup):
        fn()
    device.synchronize()
    start = time.perf_counter()
    fn()
    device.synchronize()
    inner = max(1, min(1000, int(min_seconds / max(time.perf_counter() - start, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        device.synchronize()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def timed_pair(fn, device, repeats: int) -> tuple[float, float]:
    """(median, best) seconds of fn(), as `timed` measures them."""
    times = []
    timed(fn, device, 1)  # warm up (and compile) outside the measured repeats
    for _ in range(repeats):
        times.append(timed(fn, device, 1, warmup=0))
    return statistics.median(times), min(times)


def timed_with_copy(fn, copy, device, repeats: int) -> tuple[float, float, float, float]:
    """(median, best) seconds of fn() and of copy(), timed alternately in the same repeats: the share
    of a copy then compares the two under the same load and allocator state (on a shared machine a
    copy timed once, minutes earlier, moved the shares by 2x between runs)."""
    times, copy_times = [], []
    timed(fn, device, 1)  # warm up (and compile) outside the measured repeats
    timed(copy, device, 1)
    for _ in range(repeats):
        copy_times.append(timed(copy, device, 1, warmup=0))
        times.append(timed(fn, device, 1, warmup=0))
    return statistics.median(times), min(times), statistics.median(copy_times), min(copy_times)


def bench_operands(device, shapes: list[tuple[int, int]], dtype: torch.dtype, repeats: int) -> list[dict]:
    """Each quantizer against a copy of the same operand, reference (torch) and fused (auto) paths."""
    rows = []
    for shape in shapes:
        x = torch.randn(*shape, device=device.torch_device, dtype=dtype)
        copy = lambda x=x: x.clone()  # noqa: E731
        copy_med, copy_best = timed_pair(copy, device, repeats)
        size = "x".join(map(str, shape))
        rows.append({"shape": size, "op": "copy (reference)", "fmt": "-", "rounding": "-", "backend": "-",
                     "seconds": copy_med, "best_seconds": copy_best, "copy_seconds": copy_med,
                     "pct_of_copy": 100.0, "best_pct_of_copy": 100.0})

        def row(op, fmt, rounding, backend, fn, copy=copy, size=size):
            med, best, c_med, c_best = timed_with_copy(fn, copy, device, repeats)
            rows.append({"shape": size, "op": op, "fmt": fmt, "rounding": rounding, "backend": backend,
                         "seconds": med, "best_seconds": best, "copy_seconds": c_med,
                         "pct_of_copy": 100 * c_med / med, "best_pct_of_copy": 100 * c_best / best})

        for fmt in ("fp8_e4m3", "fp8_e5m2", "nvfp4"):
            for rounding in ("nearest", "stochastic"):
                for backend in ("torch", "auto"):
                    for op, call in (("fake_quantize", fake_quantize), ("quantize", quantize)):
                        gen = SRGenerator(0)
                        row(op, fmt, rounding, backend, lambda x=x, c=call, f=fmt, r=rounding, b=backend, g=gen:
                            c(x, f, rounding=r, generator=g, backend=b))
                    if rounding == "nearest":  # what backward does with a saved operand: back to x's dtype
                        qt = quantize(x, fmt, backend="torch")
                        row("dequantize", fmt, "-", backend, lambda qt=qt, b=backend: qt.dequantize(dtype, backend=b))
                    if rounding == "nearest" and fmt == "nvfp4":  # x_t and w_t: blocks along axis 0, as saved
                        qt = quantize(x, fmt, axis=0)
                        row("dequantize (axis 0)", fmt, "-", backend, lambda qt=qt, b=backend: qt.dequantize(dtype, backend=b))
    return rows


def profile_quantizers(device, shape: tuple[int, int], dtype: torch.dtype) -> None:
    """torch.profiler's operator table (self CPU time) for NVFP4 and FP8 fake_quantize, reference and fused."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(*shape, device=device.torch_device, dtype=dtype)
    for fmt in ("nvfp4", "fp8_e4m3"):
        for backend in ("torch", "auto"):
            gen = SRGenerator(0)
            for _ in range(2):  # warm up (and compile)
                fake_quantize(x, fmt, generator=gen, backend=backend)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    fake_quantize(x, fmt, generator=gen, backend=backend)
            print(f"\nprofile: fake_quantize {fmt} nearest, backend={backend}, {'x'.join(map(str, shape))} {dtype} "
                  "(3 calls)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def bench_quantizers(device, elements: int, dtype: torch.dtype, repeats: int) -> list[dict]:
    cols = 4096 if elements >= 4096 * 32 else 256
    x = torch.randn(elements // cols, cols, device=device.torch_device, dtype=dtype)
    moved = 2 * x.numel() * x.element_size()  # read x, write a tensor of the same size
    copy_s = timed(lambda: x.clone(), device, repeats)
    rows = [{"op": "copy (reference)", "rounding": "-", "seconds": copy_s, "elements_per_s": x.numel() / copy_s,
             "GB_per_s": moved / copy_s / 1e9, "vs_copy": 1.0}]
    gen = SRGenerator(0)
    for fmt in FORMATS:
        for rounding in ("nearest", "stochastic"):
            s = timed(lambda fmt=fmt, rounding=rounding: fake_quantize(x, fmt, rounding=rounding, generator=gen),
                      device, repeats)
            rows.append({"op": f"fake_quantize {fmt}", "rounding": rounding, "seconds": s,
                         "elements_per_s": x.numel() / s, "GB_per_s": moved / s / 1e9, "vs_copy": copy_s / s})
    return rows


def bench_kernels(device, x: torch.Tensor, copy_gbs: float, repeats: int) -> list[dict]:
    """The fused Triton quantizers alone, where they run compiled on x's device (else no rows: the
    CPU's Triton interpreter is for tests, not timings)."""
    from megatron_lowp.device import triton_kernels_usable
    from megatron_lowp.numerics import triton_kernels as tk
    from megatron_lowp.numerics.formats import E4M3, E5M2

    if x.device.type == "cpu" or not triton_kernels_usable(x):
        return []
    scale = torch.ones((), dtype=torch.float32, device=x.device)
    calls = {("fp8_e4m3", 1.0): lambda r, g: tk.fp8_quantize(x, scale, E4M3, r, g),
             ("fp8_e5m2", 1.0): lambda r, g: tk.fp8_quantize(x, scale, E5M2, r, g),
             ("nvfp4", 0.5 + 1 / 16): lambda r, g: tk.nvfp4_quantize(x, scale, r, g)}
    rows = []
    for (fmt, out_bytes), call in calls.items():
        moved = x.numel() * (x.element_size() + out_bytes)
        for rounding in ("nearest", "stochastic"):
            gen = SRGenerator(0)
            s = timed(lambda call=call, rounding=rounding, gen=gen: call(rounding, gen), device, repeats)
            rows.append({"op": f"triton {fmt}", "rounding": rounding, "seconds": s, "elements_per_s": x.numel() / s,
                         "GB_per_s": moved / s / 1e9, "vs_copy": moved / s / 1e9 / copy_gbs})
    return rows


RECIPES = {
    "fp8 (paper roles)": GemmSpecs(
        x=QuantSpec("fp8_e4m3"), w=QuantSpec("fp8_e4m3"), dy=QuantSpec("fp8_e5m2", "stochastic"),
        w_t=QuantSpec("fp8_e5m2"), dy_t=QuantSpec("fp8_e5m2", "stochastic"), x_t=QuantSpec("fp8_e5m2")),
    "nvfp4 (all the way)": GemmSpecs(
        x=QuantSpec("nvfp4"), w=QuantSpec("nvfp4"), dy=QuantSpec("nvfp4", "stochastic"), w_t=QuantSpec("nvfp4"),
        dy_t=QuantSpec("nvfp4", "stochastic"), x_t=QuantSpec("nvfp4", "stochastic")),
}


def fwd_bwd(layer: nn.Module, x: torch.Tensor, device, autocast_dtype) -> None:
    with device.autocast(autocast_dtype):
        y = layer(x)
    y.float().sum().backward()


def bench_linears(device, sizes: list[tuple[int, int, int]], autocast_dtype, repeats: int) -> list[dict]:
    rows = []
    for tokens, k, n in sizes:
        x = torch.randn(tokens, k, device=device.torch_device, requires_grad=True)
        base = nn.Linear(k, n, bias=False).to(device.torch_device)
        base_s = timed(lambda base=base, x=x: fwd_bwd(base, x, device, autocast_dtype), device, repeats)
        rows.append({"size": f"{tokens}x{k}->{n}", "layer": "nn.Linear", "seconds": base_s, "vs_linear": 1.0})
        for name, specs in RECIPES.items():
            layer = QuantizedLinear(k, n, specs, name="bench").to(device.torch_device)
            s = timed(lambda layer=layer, x=x: fwd_bwd(layer, x, device, autocast_dtype), device, repeats)
            rows.append({"size": f"{tokens}x{k}->{n}", "layer": name, "seconds": s, "vs_linear": s / base_s})
    return rows


def print_table(rows: list[dict], columns: list[str]) -> None:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3e}" if v < 0.01 or v > 1e5 else f"{v:.3f}"
        return str(v)

    widths = [max(len(c), *(len(cell(r[c])) for r in rows)) for c in columns]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(cell(r[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--elements", type=int, default=None,
                        help="quantizer input size (default: 128 Mi BF16 elements = 256 MiB on accelerators, 16 Mi (32 MiB, past the caches) on CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=None, metavar="TOKENSxKxN",
                        help="linear layer shapes (default: 512 and 1024 cubed on CPU; 4096^3 and 8192x4096->11008 elsewhere)")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="ROWSxCOLS",
                        help="operand shapes for the per-operand table (default: the tiny model's 4096x256 and "
                             "4096x704 and a larger 4096x4096, or (N/256)x256 with --elements N; 0 skips the table)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="operand dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave it)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables at 4096x704")
    parser.add_argument("--only-operands", action="store_true",
                        help="the per-operand table only (skip the all-format quantizer table and the linears)")
    parser.add_argument("--out", default="bench/bench_numerics.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    on_cpu = device.capabilities.name == "cpu"
    elements = args.elements or (16 * 2**20 if on_cpu else 128 * 2**20)
    sizes = [(512, 512, 512), (1024, 1024, 1024)] if on_cpu else [(4096, 4096, 4096), (8192, 4096, 11008)]
    if args.sizes:
        sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes]
    autocast_dtype = torch.bfloat16 if device.supports_autocast(torch.bfloat16) else None
    dtype = getattr(torch, args.dtype)
    # the tiny model's operands and a larger one; with --elements alone, one operand of that size
    shapes = [(4096, 256), (4096, 704), (4096, 4096)] if args.elements is None else [(args.elements // 256, 256)]
    if args.shapes:
        shapes = [] if args.shapes == ["0"] else [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    print(f"device: {device.capabilities.name}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
          f"input {elements:,} bf16 elements")
    if args.profile:
        profile_quantizers(device, (4096, 704), dtype)
    operands = bench_operands(device, shapes, dtype, args.repeats)
    if operands:
        print(f"per operand ({args.dtype}): median seconds and % of the throughput of a copy timed alongside "
              "(best repeats alongside)")
        print_table(operands, ["shape", "op", "fmt", "rounding", "backend", "seconds", "copy_seconds", "pct_of_copy",
                               "best_pct_of_copy"])
        print()

    if args.only_operands:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": device.capabilities.name, "torch": torch.__version__,
                                              "threads": torch.get_num_threads(), "operands": operands,
                                              "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
        print(f"wrote {args.out}")
        return 0
    quant = bench_quantizers(device, elements, torch.bfloat16, args.repeats)
    print_table(quant, ["op", "rounding", "seconds", "elements_per_s", "GB_per_s", "vs_copy"])
    print()
    cols = 4096 if elements >= 4096 * 32 else 256  # as bench_quantizers shapes its input
    x = torch.randn(elements // cols, cols, device=device.torch_device, dtype=torch.bfloat16)
    kernels = bench_kernels(device, x, quant[0]["GB_per_s"], args.repeats)
    if kernels:
        print("fused kernels alone (bytes read + written, against the copy above):")
        print_table(kernels, ["op", "rounding", "seconds", "elements_per_s", "GB_per_s", "vs_copy"])
    else:
        print("fused kernels: not usable on this device here (the torch path serves every call)")
    print()
    linears = bench_linears(device, sizes, autocast_dtype, args.repeats)
    print_table(linears, ["size", "layer", "seconds", "vs_linear"])

    result = {"device": device.capabilities.name, "torch": torch.__version__, "python": platform.python_version(),
              "host": platform.node(), "threads": torch.get_num_threads(), "elements": elements, "quantizers": quant,
              "kernels": kernels, "operands": operands, "linears": linears,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
