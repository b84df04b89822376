"""`megatron-lowp` command line (also `python -m megatron_lowp`).

    megatron-lowp train RECIPE.yaml [section.key=value ...]
    megatron-lowp config RECIPE.yaml [section.key=value ...]   # print the resolved recipe

User mistakes (UserError) print one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megatron_lowp.errors import UserError


def _load(args):
    from megatron_lowp.config import load_config
    from megatron_lowp.precision import available_recipes

    return load_config(args.recipe, args.overrides, extra_choices={"precision.recipe": available_recipes()})


def cmd_train(args) -> int:
    from megatron_lowp.eval import plot_loss
    from megatron_lowp.train import train
    from megatron_lowp.train.metrics import read_metrics

    cfg = _load(args)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports for the job
    plot = plot_loss({cfg.run.name: read_metrics(result.run_dir / "metrics.jsonl")}, result.run_dir / "loss.png",
                     title=f"{cfg.run.name} ({cfg.precision.recipe})")
    val = f", val_loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(
        f"done: step {result.step}, {result.tokens:,} tokens, loss {result.loss:.4f}{val}, "
        f"{result.seconds:.0f} s; run directory {result.run_dir}"
        + (f"; checkpoint {result.checkpoint}" if result.checkpoint else "")
        + f"; loss curve {plot}"
    )
    return 0


def cmd_config(args) -> int:
    from megatron_lowp.config import dump_config

    print(dump_config(_load(args)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from megatron_lowp import __version__

    parser = argparse.ArgumentParser(prog="megatron-lowp", description="LLM pretraining in low precision.")
    parser.add_argument("--version", action="version", version=f"megatron-lowp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in [
        ("train", cmd_train, "train from a YAML recipe (resumes automatically)"),
        ("config", cmd_config, "print the fully resolved recipe and exit"),
    ]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/quickstart.yaml")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=200")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"megatron-lowp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megatron-lowp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
