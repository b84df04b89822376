"""Training throughput of precision recipes, side by side in one process.

    python scripts/bench_train.py recipes/tiny/bf16.yaml --recipes bf16 fp8 fp4 --steps 5 --rounds 3 \\
        [--out bench/my-run] [override ...]

Every recipe trains the same model on the same data (the recipe file, with precision.recipe set to
each name; `ngpt_fp4` style recipes that need another architecture take their own file with
--recipe-file NAME=PATH). An entry of --recipes may carry a label, LABEL=RECIPE, and --set LABEL
KEY=VALUE gives one entry its own overrides, so one recipe can run in several variants:

    --recipes bf16 fp8 bf16-nondet=bf16 --set fp8 precision.backend=native --set bf16-nondet device.deterministic=false

After --warmup steps per entry, the entries take turns for --rounds rounds of --steps steps each, so
drift in machine load hits them alike; the table reports the median round. Each entry's
device.deterministic is applied before its turn (torch's switch is process-wide). --time-limit stops
the rounds early (after at least one) once the script has run that long.
Columns: tokens/s, step time, model FLOPs utilization against the device's dense BF16 peak
(6 N + 12 L d s FLOPs per token; n/a where the peak is unknown, e.g. CPUs), peak memory (per entry
on accelerators; on the CPU the whole process's peak RSS), and each entry's step time and tokens/s
relative to the first entry (normally bf16). Writes bench_train.json and bench_train.md into --out
(default: a new folder under bench/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_lowp.config import load_config  # noqa: E402
from megatron_lowp.config.schema import TrainConfig  # noqa: E402
from megatron_lowp.precision import available_recipes  # noqa: E402
from megatron_lowp.train.loop import Trainer  # noqa: E402


def flops_per_token(model, cfg) -> float:
    """Training FLOPs per token: 6 per non-embedding parameter (forward + backward) plus attention
    scores and values, 12 * layers * d_model * seq_len (the PaLM / Megatron estimate)."""
    m = cfg.model
    return 6 * model.num_params(exclude_embeddings=True) + 12 * m.n_layers * m.d_model * cfg.train.seq_len


def compile_key_exists() -> bool:
    """Whether the schema has train.compile (torch.compile of the model), so variants can use it."""
    return any(f.name == "compile" for f in fields(TrainConfig))


def parse_variants(entries: list[str], sets: list[list[str]]) -> dict[str, tuple[str, list[str]]]:
    """--recipes entries (RECIPE or LABEL=RECIPE) and --set LABEL KEY=VALUE pairs -> {label: (recipe, overrides)}."""
    variants: dict[str, tuple[str, list[str]]] = {}
    for entry in entries:
        label, _, recipe = entry.partition("=")
        if label in variants:
            raise SystemExit(f"bench_train: --recipes names {label!r} twice; give one of them a label (LABEL=RECIPE)")
        variants[label] = (recipe or label, [])
    for label, override in sets:
        if label not in variants:
            raise SystemExit(f"bench_train: --set {label}: no such entry in --recipes ({', '.join(variants)})")
        variants[label][1].append(override)
    return variants


def build(recipe_file: Path, label: str, recipe: str, overrides: list[str], out_dir: str) -> Trainer:
    cfg = load_config(recipe_file, [*overrides, f"precision.recipe={recipe}", f"run.out_dir={out_dir}",
                                    f"run.name=bench-{label}", "run.resume=never", "train.eval_every=0",
                                    "train.checkpoint_every=0", "logging.progress=false"],
                      extra_choices={"precision.recipe": available_recipes()})
    return Trainer(cfg)


def peak_memory(trainer: Trainer) -> int:
    """Peak device memory of the last round where the device tracks it (per recipe); on the CPU the
    process's peak RSS, which is shared by every recipe in the process."""
    stats = trainer.device.memory_stats()
    return stats.get("peak_allocated", max(stats.values(), default=0))


def timed_steps(trainer: Trainer, steps: int) -> float:
    trainer.device.set_deterministic(trainer.cfg.device.deterministic)  # process-wide: this entry's own
    trainer.device.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = trainer.train_step()
    loss.item()  # the last step's work is done
    trainer.device.synchronize()
    return (time.perf_counter() - start) / steps


def markdown(rows: list[dict], header: str) -> str:
    base = next(r["label"] for r in rows if "error" not in r)
    lines = [header, "",
             f"| entry | recipe | tokens/s | step time (s) | MFU | peak memory (MiB) | step time vs {base} | "
             f"tokens/s vs {base} |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['recipe']} | failed: {r['error'][:200]} | | | | | |")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['label']} | {r['recipe']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {mfu} | "
                     f"{r['peak_memory_bytes'] / 2**20:,.0f} | {r['step_time_vs_first']:.2f}x | "
                     f"{r['tokens_per_s_vs_first']:.2f}x |")
    return "\n".join(lines) + "\n"


def progress(line: str) -> None:
    """Long benchmarks show where they are (stderr, so a piped table stays clean)."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def start(variants: dict, files: dict, args, tmp: str) -> tuple[dict[str, Trainer], dict[str, str]]:
    """Build each entry and run its warm-up steps; an entry that fails is reported with its error
    and leaves the others their turns."""
    trainers, failed = {}, {}
    for label, (recipe, own) in variants.items():
        try:
            trainers[label] = build(Path(files.get(label, files.get(recipe, args.recipe_file))), label, recipe,
                                    [*args.overrides, *own], tmp)
            progress(f"{label}: built; {args.warmup} warm-up steps")
            timed_steps(trainers[label], args.warmup)
        except Exception as e:  # any failure of one entry is that entry's result
            failed[label] = f"{type(e).__name__}: {e}"
            trainers.pop(label, None)
            print(f"{label}: failed: {failed[label]}")
    return trainers, failed


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe_file", type=Path)
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every recipe")
    parser.add_argument("--recipes", nargs="+", default=["bf16", "fp8", "fp4"], help="RECIPE or LABEL=RECIPE")
    parser.add_argument("--set", nargs=2, action="append", default=[], metavar=("LABEL", "KEY=VALUE"), dest="sets",
                        help="an override for one entry of --recipes only (repeatable)")
    parser.add_argument("--recipe-file", action="append", default=[], metavar="NAME=PATH", dest="own_files",
                        help="an entry (label or recipe) that needs its own file (e.g. ngpt_fp4=recipes/tiny/ngpt_fp4.yaml)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="start no further round once the script has run this long (at least one round runs)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for bench_train.json and bench_train.md (default: bench/train-<date>-<time>)")
    args = parser.parse_args(argv)
    out = args.out or Path("bench") / time.strftime("train-%Y%m%d-%H%M%S")
    variants = parse_variants(args.recipes, args.sets)
    files = dict(item.split("=", 1) for item in args.own_files)
    with tempfile.TemporaryDirectory() as tmp:
        trainers, failed = start(variants, files, args, tmp)
        times: dict[str, list[float]] = {label: [] for label in trainers}
        peaks: dict[str, int] = dict.fromkeys(trainers, 0)
        for i in range(args.rounds):
            round_start = time.perf_counter()
            for label, trainer in trainers.items():
                trainer.device.reset_peak_memory()
                times[label].append(timed_steps(trainer, args.steps))
                progress(f"round {i + 1}/{args.rounds}: {label} {times[label][-1]:.2f} s per step (mean of {args.steps})")
                peaks[label] = max(peaks[label], peak_memory(trainer))
            now = time.perf_counter()
            if args.time_limit is not None and i + 1 < args.rounds and now + (now - round_start) - started > args.time_limit:
                print(f"--time-limit {args.time_limit:g} s: stopping after {i + 1} of {args.rounds} rounds")
                break
        rows = []
        for label, trainer in trainers.items():
            cfg, caps = trainer.cfg, trainer.device.capabilities
            step_s = statistics.median(times[label])
            tokens_per_s = cfg.train.global_batch_size * cfg.train.seq_len / step_s
            peak = caps.peak_bf16_flops
            mfu = flops_per_token(trainer.model, cfg) * tokens_per_s / peak if peak else None
            rows.append({"label": label, "recipe": cfg.precision.recipe, "device": caps.name, "step_s": step_s,
                         "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_memory_bytes": peaks[label],
                         "params": trainer.model.num_params(), "rounds_s": times[label],
                         "preset": cfg.model.preset, "seq_len": cfg.train.seq_len,
                         "micro_batch_size": cfg.train.micro_batch_size,
                         "global_batch_size": cfg.train.global_batch_size,
                         "deterministic": cfg.device.deterministic, "backend": cfg.precision.backend,
                         "compile": getattr(cfg.train, "compile", None),
                         "overrides": [*args.overrides, *variants[label][1]]})
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        base = rows[0]
        for r in rows:
            r["step_time_vs_first"] = r["step_s"] / base["step_s"]
            r["tokens_per_s_vs_first"] = r["tokens_per_s"] / base["tokens_per_s"]
    order = list(variants)
    rows = sorted(rows + [{"label": label, "recipe": variants[label][0], "error": error} for label, error in failed.items()],
                  key=lambda r: order.index(r["label"]))
    (out / "bench_train.json").write_text(json.dumps(rows, indent=1))
    if trainers:
        table = markdown(rows, f"device: {base['device']}; {len(base['rounds_s'])} rounds x {args.steps} steps per "
                               f"entry after {args.warmup} warm-up steps; median round")
        print(table, end="")
        (out / "bench_train.md").write_text(table)
    print(f"wrote {out}/bench_train.json" + (" and bench_train.md" if trainers else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
