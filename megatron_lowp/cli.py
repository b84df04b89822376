"""`megatron-lowp` command line (also `python -m megatron_lowp`).

    megatron-lowp train RECIPE.yaml [section.key=value ...]
    megatron-lowp config RECIPE.yaml [section.key=value ...]   # print the resolved recipe
    megatron-lowp train RECIPE.yaml --plan DIR/plan.yaml       # with a precision plan (megatron-lowp probe)
    megatron-lowp probe RECIPE_OR_RUN [overrides] [--steps N] [--bf16-budget F] --out DIR
    megatron-lowp memory RECIPE.yaml [section.key=value ...] [--measured RUN_DIR]   # the memory ledger
    megatron-lowp tokenizer train --input FILE_OR_GLOB... --vocab-size N --output PATH.model
    megatron-lowp prepare --input FILE_OR_GLOB_OR_HF_NAME... --tokenizer PATH.model --output-prefix PREFIX

User mistakes (UserError) print one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time

from megatron_lowp.errors import Preempted, UserError


def _load(args):
    from megatron_lowp.config import load_config
    from megatron_lowp.precision import available_recipes

    return load_config(args.recipe, args.overrides, extra_choices={"precision.recipe": available_recipes()},
                       plan=getattr(args, "plan", None))  # memory has no --plan


def cmd_train(args) -> int:
    from megatron_lowp.eval import plot_loss
    from megatron_lowp.run.logs import read_jsonl
    from megatron_lowp.train import train

    cfg = _load(args)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports for the job
    try:
        plot = plot_loss({cfg.run.name: read_jsonl(result.run_dir / "metrics.jsonl")}, result.run_dir / "loss.png",
                         title=f"{cfg.run.name} ({cfg.precision.recipe})")
    except OSError as e:  # the run and its checkpoint are complete: a picture that cannot be written is no failure
        plot = f"not drawn ({e.strerror or e})"
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
    from megatron_lowp.data.tokenizer import Tokenizer, resolve_vocab_size

    cfg = _load(args)
    try:  # as training resolves it; a tokenizer not on this machine cannot resolve a null, so say so
        tokenizer = Tokenizer.load(cfg.data.tokenizer)
    except UserError as e:
        if cfg.model.vocab_size is None:
            print(f"megatron-lowp: note: model.vocab_size stays null: {e}", file=sys.stderr)
    else:
        cfg.model.vocab_size = resolve_vocab_size(cfg.model.vocab_size, tokenizer, cfg.data.tokenizer)
    print(dump_config(cfg), end="")
    return 0


def _read_options(args):
    from megatron_lowp.data.sources import ReadOptions

    return ReadOptions(text_key=args.text_key, encoding_errors=args.encoding_errors, hf_config=args.hf_config,
                       hf_split=args.hf_split, streaming=args.streaming, hf_cache_dir=args.hf_cache_dir)


def cmd_prepare(args) -> int:
    from megatron_lowp.data.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(inputs=args.input, tokenizer=args.tokenizer, output_prefix=args.output_prefix,
                        valid_fraction=args.valid_fraction, test_fraction=args.test_fraction, workers=args.workers,
                        append_eos=args.append_eos, prepend_bos=args.bos, seed=args.seed, overwrite=args.overwrite,
                        progress=not args.no_progress, read=_read_options(args))
    print(prepare(cfg).report())
    return 0


def cmd_tokenizer_train(args) -> int:
    from megatron_lowp.data.tokenizer_train import TokenizerTrainConfig, train_tokenizer

    cfg = TokenizerTrainConfig(inputs=args.input, vocab_size=args.vocab_size, output=args.output,
                               model_type=args.model_type, sample_docs=args.sample_docs,
                               max_doc_chars=args.max_doc_chars, character_coverage=args.character_coverage,
                               seed=args.seed, threads=args.threads, read=_read_options(args))
    print(train_tokenizer(cfg).report())
    return 0


def _add_input_arguments(p: argparse.ArgumentParser) -> None:
    from megatron_lowp.data.sources import ENCODING_ERRORS

    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="INPUT",
                   help="files (.txt: one document per file; .jsonl; .parquet; .gz/.xz/.bz2 compressed text), "
                        "directories, globs, BUILDER:FILES (json, csv, parquet, text, arrow via the datasets "
                        "library) or hf:NAME / a Hugging Face dataset name")
    p.add_argument("--text-key", default="text", help="JSONL field / Parquet or dataset column with the text")
    p.add_argument("--encoding-errors", default="strict", choices=ENCODING_ERRORS,
                   help="invalid UTF-8: strict stops with the file and byte offset; replace puts U+FFFD")
    p.add_argument("--hf-config", default=None, help="datasets inputs: the configuration name")
    p.add_argument("--hf-split", default="train", help="datasets inputs: the split to read")
    p.add_argument("--streaming", action="store_true", help="datasets inputs: stream instead of downloading first")
    p.add_argument("--hf-cache-dir", default=None, help="datasets inputs: cache folder")


def _add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    from megatron_lowp.data.prepare import default_workers

    _add_input_arguments(p)
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model file (or 'embedded')")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX_train.bin/.idx, PREFIX_valid.bin/.idx (and PREFIX_test.*), PREFIX_prepare.json")
    p.add_argument("--valid-fraction", type=float, default=0.01, help="share of documents held out for validation")
    p.add_argument("--test-fraction", type=float, default=0.0, help="share of documents for a test split")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="tokenizer processes (default: the usable cores); 0 tokenizes in this process")
    p.add_argument("--append-eos", dest="append_eos", action="store_true", default=True,
                   help="end every document with EOS (the default)")
    p.add_argument("--no-eos", dest="append_eos", action="store_false", help="do not append EOS")
    p.add_argument("--bos", action="store_true", help="start every document with BOS")
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/valid/test split rule")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --output-prefix")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_tokenizer_train_arguments(p: argparse.ArgumentParser) -> None:
    from megatron_lowp.data.tokenizer_train import MODEL_TYPES

    _add_input_arguments(p)
    p.add_argument("--vocab-size", type=int, required=True, help="number of pieces, e.g. 32000")
    p.add_argument("--output", required=True, help="the model file to write, PATH.model (PATH.vocab too)")
    p.add_argument("--model-type", default="bpe", choices=MODEL_TYPES)
    p.add_argument("--sample-docs", type=int, default=100_000, help="train on a uniform sample of this many documents")
    p.add_argument("--max-doc-chars", type=int, default=20_000, help="cut sampled documents to this many characters")
    p.add_argument("--character-coverage", type=float, default=0.9995, help="sentencepiece's character_coverage")
    p.add_argument("--seed", type=int, default=1234, help="seed of the document sample")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="sentencepiece trainer threads")


def cmd_eval(args) -> int:
    from pathlib import Path

    from megatron_lowp.eval.evaluate import evaluate

    task_options = {"--num-fewshot": args.num_fewshot, "--limit": args.limit, "--batch-size": args.batch_size,
                    "--include-path": args.include_path, "--bootstrap-iters": args.bootstrap_iters}
    loss_options = {"--data": args.data, "--samples": args.samples}
    for flag, value in (loss_options if args.tasks else task_options).items():
        if value is not None:
            raise UserError(f"{flag} only applies {'without' if args.tasks else 'with'} --tasks")
    if args.tasks:
        return _eval_tasks(args)
    r = evaluate(Path(args.checkpoint), data=args.data, samples=args.samples, bf16=not args.no_bf16)
    t = r["trained_precision"]
    print(f"step {r['step']}: {t['precision']} loss {t['loss']:.4f}, perplexity {t['perplexity']:.2f} "
          f"({t['tokens']:,} tokens of {r['data']})")
    if "bf16" in r:
        print(f"         bf16 loss {r['bf16']['loss']:.4f}, perplexity {r['bf16']['perplexity']:.2f} "
              f"(bf16 - {t['precision']}: {r['bf16_minus_trained']:+.4f})")
    print(f"wrote {r['written']}")
    return 0


def _eval_tasks(args) -> int:
    from pathlib import Path

    from megatron_lowp.eval.harness import run_tasks, tasks_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks: give a comma-separated list of lm_eval tasks, e.g. --tasks hellaswag,arc_easy")
    r = run_tasks(Path(args.checkpoint), tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                  batch_size=1 if args.batch_size is None else args.batch_size, include_path=args.include_path, bf16=not args.no_bf16,
                  bootstrap_iters=1000 if args.bootstrap_iters is None else args.bootstrap_iters)
    print(f"step {r['step']} ({r['checkpoint']}), lm_eval {r['lm_eval_version']}:")
    print(tasks_table(r))
    print(f"wrote {r['written']}")
    return 0


def cmd_generate(args) -> int:
    from pathlib import Path

    from megatron_lowp.eval.evaluate import generate, load_model

    loaded = load_model(Path(args.checkpoint))
    text = generate(loaded, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    print(args.prompt + text)
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from megatron_lowp.eval.export import export_hf

    out = export_hf(Path(args.checkpoint), Path(args.out))
    print(f"wrote a Hugging Face Llama checkpoint to {out} (transformers.LlamaForCausalLM.from_pretrained)")
    return 0


def cmd_probe(args) -> int:
    from pathlib import Path

    from megatron_lowp.eval.probe_run import run_probe
    from megatron_lowp.train.probe_steps import train_for_probe

    data = run_probe(args.source, args.overrides, Path(args.out), train_for_probe, steps=args.steps,
                     budget=args.bf16_budget, batch_size=args.batch, rank_by=args.rank_by)
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"))
    print(f"plan: {args.out}/plan.yaml ({100 * data['plans']['probe']['flops_fraction']:.1f}% of the quantized GEMM "
          f"FLOPs in BF16); train with it: {data['train_command']}")
    return 0


def cmd_compare(args) -> int:
    from pathlib import Path

    from megatron_lowp.eval.compare import write_comparison

    write_comparison([Path(r) for r in args.runs], Path(args.baseline), Path(args.out), args.allow_different_validation)
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"))
    print(f"wrote {args.out}/report.md, summary.json and loss.png")
    return 0


def cmd_memory(args) -> int:
    from pathlib import Path

    from megatron_lowp.memory.report import memory_report

    text, result = memory_report(_load(args), args.world_size, Path(args.measured) if args.measured else None)
    print(text, end="")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
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
        p.add_argument("--plan", help="a precision plan (DIR/plan.yaml from megatron-lowp probe): its precision keys "
                       "go over the recipe's, under the command line's overrides")
        p.set_defaults(func=func)
    p = sub.add_parser("probe", help="measure where a recipe's low precision hurts, per linear and GEMM role, and "
                       "write a plan that keeps the worst linears in BF16")
    p.add_argument("source", help="a YAML recipe (trained for --steps first), or a run / checkpoint directory")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the recipe (a checkpoint: only "
                   "precision.recipe=NAME)")
    p.add_argument("--steps", type=int, default=10, help="a recipe: training steps before probing (default 10; "
                   "0 probes the initial weights)")
    p.add_argument("--bf16-budget", type=float, default=0.1, help="the plan's budget: the fraction of the "
                   "quantized GEMM FLOPs it may keep in BF16 (default 0.1)")
    p.add_argument("--batch", type=int, default=None, help="sequences in the probed batch (default: "
                   "train.micro_batch_size)")
    p.add_argument("--rank-by", default="damage", help="damage (default), forward, gradient or gemm: what the "
                   "ranking and the plan follow (docs/probe.md)")
    p.add_argument("--out", required=True, help="directory for report.md, summary.json, heatmap.png, plan.yaml")
    p.set_defaults(func=cmd_probe)
    p = sub.add_parser("prepare", help="tokenize raw text into Megatron indexed datasets (train/valid splits)")
    _add_prepare_arguments(p)
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint, in its precision and in BF16")
    p.add_argument("checkpoint", help="a run directory (newest checkpoint) or a checkpoint directory")
    p.add_argument("--data", help="an indexed-dataset prefix to evaluate on (default: the recipe's data.valid)")
    p.add_argument("--samples", type=int, help="validation sequences (default: the recipe's train.eval_samples, "
                   "the set its val_loss was measured on)")
    p.add_argument("--no-bf16", action="store_true", help="skip the BF16 evaluation of the same weights")
    p.add_argument("--tasks", help="instead of the loss, run these lm-evaluation-harness tasks (comma-separated, "
                   "e.g. hellaswag,arc_easy,arc_challenge,piqa,winogrande); needs the [eval] extra")
    p.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples (default: the task's)")
    p.add_argument("--limit", type=float, default=None, help="--tasks: at most this many documents per task "
                   "(a fraction if < 1); for quick checks, not for reported numbers")
    p.add_argument("--batch-size", type=int, default=None, help="--tasks: sequences per forward (default 1, which keeps every "
                   "score independent of its batch-mates under per-tensor low-precision scales)")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="--tasks: a folder of your own task YAMLs (repeatable)")
    p.add_argument("--bootstrap-iters", type=int, default=None,
                   help="--tasks: bootstrap resamples for stderrs (default 1000; 0: none)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("generate", help="continue a prompt with a trained checkpoint (greedy or sampled)")
    p.add_argument("checkpoint", help="a run directory (newest checkpoint) or a checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("export", help="export a checkpoint as a Hugging Face Llama (safetensors, config, tokenizer)")
    p.add_argument("checkpoint", help="a run directory (newest checkpoint) or a checkpoint directory")
    p.add_argument("--format", choices=["hf"], default="hf")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("compare", help="compare runs against a baseline run: report.md, summary.json, loss.png")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--baseline", required=True, help="the baseline run directory (e.g. the BF16 run)")
    p.add_argument("--out", required=True, help="directory for report.md, summary.json and loss.png")
    p.add_argument("--allow-different-validation", action="store_true",
                   help="report runs validated on other sequences or with another tokenizer (flagged) instead of refusing")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("memory", help="predict a recipe's memory by category (params, grads, optimizer, saved "
                       "activations per layer and GEMM role, ...), beside a run's measurement with --measured")
    p.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/tiny/fp8.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.activation_checkpointing=full")
    p.add_argument("--measured", help="a run directory: its memory.json (what the trainer measured) beside the prediction")
    p.add_argument("--world-size", type=int, default=1, help="ranks the run will use (fsdp shards over them)")
    p.add_argument("--json", help="also write the ledger(s) to this JSON file")
    p.set_defaults(func=cmd_memory)
    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    p = tok_sub.add_parser("train", help="train a sentencepiece BPE/unigram tokenizer on a sample of a corpus")
    _add_tokenizer_train_arguments(p)
    p.set_defaults(func=cmd_tokenizer_train)
    return parser


def _fail(line: str, status: int) -> int:
    """Print a user error as one line; under torchrun, also hand it to the launcher (its error file),
    so torchrun's failure report names our message rather than pointing at its traceback docs."""
    line = " ".join(line.split("\n"))
    print(line, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            with open(error_file, "w", encoding="utf-8") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:
            pass
    return status


def main(argv: list[str] | None = None) -> int:
    # A command line may hold bytes that are not UTF-8 (they arrive as surrogates): echo them back
    # escaped in messages instead of failing to print the message itself.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:  # argparse leaves the overrides that follow an option (train R.yaml --plan P a=b); keep their order
        if not hasattr(args, "overrides") or any(r.startswith("-") for r in rest):
            parser.parse_args(argv)  # its usual error
        args.overrides = [*args.overrides, *rest]
    try:
        return args.func(args)
    except UserError as e:
        return _fail(f"megatron-lowp: error: {e}", 2)
    except Preempted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"megatron-lowp: {e}", file=sys.stderr)
        return Preempted.exit_status
    except KeyboardInterrupt:
        print("megatron-lowp: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        return _fail(f"megatron-lowp: error: no space left on device writing {e.filename or 'a file'}; free some "
                     "space and run the same command again", 2)


if __name__ == "__main__":
    raise SystemExit(main())
