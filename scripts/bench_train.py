"""Training throughput of precision recipes, side by side in one process.

    python scripts/bench_train.py recipes/tiny/bf16.yaml --recipes bf16 fp8 fp4 --steps 5 --rounds 3 \\
        --out bench_train.json [override ...]

Every recipe trains the same model on the same data (the recipe file, with precision.recipe set to
each name; `ngpt_fp4` style recipes that need another architecture take their own file with
--recipe-file NAME=PATH). After --warmup steps per recipe, the recipes take turns for --rounds rounds
of --steps steps each, so drift in machine load hits them alike; the table reports the median round.
Columns: tokens/s, step time, model FLOPs utilization against the device's dense BF16 peak
(6 N + 12 L d s FLOPs per token; n/a where the peak is unknown, e.g. CPUs), peak memory (per recipe
on accelerators; on the CPU the whole process's peak RSS), and each
recipe's step time and tokens/s relative to the first recipe (normally bf16). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from megatron_lowp.config import load_config
from megatron_lowp.precision import available_recipes
from megatron_lowp.train.loop import Trainer


def flops_per_token(model, cfg) -> float:
    """Training FLOPs per token: 6 per non-embedding parameter (forward + backward) plus attention
    scores and values, 12 * layers * d_model * seq_len (the PaLM / Megatron estimate)."""
    m = cfg.model
    return 6 * model.num_params(exclude_embeddings=True) + 12 * m.n_layers * m.d_model * cfg.train.seq_len


def build(recipe_file: Path, name: str, overrides: list[str], out_dir: str) -> Trainer:
    cfg = load_config(recipe_file, [*overrides, f"precision.recipe={name}", f"run.out_dir={out_dir}",
                                    f"run.name=bench-{name}", "run.resume=never", "train.eval_every=0",
                                    "train.checkpoint_every=0", "logging.progress=false"],
                      extra_choices={"precision.recipe": available_recipes()})
    return Trainer(cfg)


def peak_memory(trainer: Trainer) -> int:
    """Peak device memory of the last round where the device tracks it (per recipe); on the CPU the
    process's peak RSS, which is shared by every recipe in the process."""
    stats = trainer.device.memory_stats()
    return stats.get("peak_allocated", max(stats.values(), default=0))


def timed_steps(trainer: Trainer, steps: int) -> float:
    trainer.device.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = trainer.train_step()
    loss.item()  # the last step's work is done
    trainer.device.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe_file", type=Path)
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every recipe")
    parser.add_argument("--recipes", nargs="+", default=["bf16", "fp8", "fp4"])
    parser.add_argument("--recipe-file", action="append", default=[], metavar="NAME=PATH", dest="own_files",
                        help="a recipe that needs its own file (e.g. ngpt_fp4=recipes/tiny/ngpt_fp4.yaml)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_train.json"))
    args = parser.parse_args()
    files = dict(item.split("=", 1) for item in args.own_files)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: build(Path(files.get(name, args.recipe_file)), name, args.overrides, tmp)
                    for name in args.recipes}
        for trainer in trainers.values():
            timed_steps(trainer, args.warmup)
        times: dict[str, list[float]] = {name: [] for name in trainers}
        peaks: dict[str, int] = dict.fromkeys(trainers, 0)
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                trainer.device.reset_peak_memory()
                times[name].append(timed_steps(trainer, args.steps))
                peaks[name] = max(peaks[name], peak_memory(trainer))
        rows = []
        for name, trainer in trainers.items():
            cfg, caps = trainer.cfg, trainer.device.capabilities
            step_s = statistics.median(times[name])
            tokens_per_s = cfg.train.global_batch_size * cfg.train.seq_len / step_s
            peak = caps.peak_bf16_flops
            mfu = flops_per_token(trainer.model, cfg) * tokens_per_s / peak if peak else None
            rows.append({"recipe": name, "device": caps.name, "step_s": step_s, "tokens_per_s": tokens_per_s,
                         "mfu": mfu, "peak_memory_bytes": peaks[name],
                         "params": trainer.model.num_params(), "rounds_s": times[name]})
    base = rows[0]
    for r in rows:
        r["step_time_vs_first"] = r["step_s"] / base["step_s"]
        r["tokens_per_s_vs_first"] = r["tokens_per_s"] / base["tokens_per_s"]
    print(f"device: {rows[0]['device']}; {args.rounds} rounds x {args.steps} steps per recipe after "
          f"{args.warmup} warm-up steps; median round")
    print(f"| recipe | tokens/s | step time (s) | MFU | peak memory (MiB) | step time vs {base['recipe']} | "
          f"tokens/s vs {base['recipe']} |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"| {r['recipe']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {mfu} | "
              f"{r['peak_memory_bytes'] / 2**20:,.0f} | {r['step_time_vs_first']:.2f}x | {r['tokens_per_s_vs_first']:.2f}x |")
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
