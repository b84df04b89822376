"""Our checkpoints as an EleutherAI lm-evaluation-harness model, and `megatron-lowp eval --tasks`.

`HarnessLM` implements lm_eval's three request types on a loaded checkpoint:
- loglikelihood(context, continuation): sum of log p(continuation tokens) and whether greedy decoding
  would have produced them;
- loglikelihood_rolling(text): the text's total log-likelihood in disjoint windows of the model's
  context length (the harness's own window rule), for perplexity tasks;
- generate_until(context, {until, max_gen_toks, do_sample, temperature, top_k}): decoding until a stop
  string, which is cut off.

Every request is scored as a fresh document: preceded by EOS, the separator the model saw before each
document in training. Context and continuation are tokenized together and split at the context's own
token count (the harness's HF convention), so sentencepiece merges at the seam do not lose text.

Requests run one sequence at a time by default. batch_size > 1 pads sequences on the right; that is
exact in BF16 (causal attention), but a low-precision recipe's per-tensor scales see the whole batch,
so a request's score then depends slightly on its batch-mates.

`run_tasks` evaluates a checkpoint in its training precision and, unless told not to, again in BF16 from
the same weights, and writes RUN/eval/step_N_tasks.json. Standard tasks (hellaswag, arc_easy, ...)
download their datasets from the Hugging Face Hub; a task YAML over local files works offline
(`--include-path DIR`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_lowp.data import Tokenizer
from megatron_lowp.errors import UserError
from megatron_lowp.eval.evaluate import Loaded, continue_tokens, decode_continuation, load_model
from megatron_lowp.run.atomic import write_text_atomic

try:
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # lm_eval is an optional extra
    raise UserError("--tasks needs lm-evaluation-harness, which is not installed: "
                    "pip install 'megatron-lowp[eval]' (or: pip install lm_eval)") from e


@register_model("megatron_lowp")
class HarnessLM(LM):
    """lm_eval model: `simple_evaluate(model="megatron_lowp", model_args="pretrained=RUN_DIR")`, or
    HarnessLM(loaded=load_model(...)). `precision` rebuilds the weights in another recipe (e.g. bf16)."""

    def __init__(self, pretrained: str | None = None, loaded: Loaded | None = None, precision: str | None = None,
                 batch_size: int | str = 1, device: str | None = None, **_ignored) -> None:
        super().__init__()
        if (pretrained is None) == (loaded is None):
            raise UserError("HarnessLM: give exactly one of pretrained=RUN_DIR_OR_CHECKPOINT or loaded=")
        self.loaded = loaded or load_model(Path(pretrained), precision=precision,
                                           device_type=(device or "auto").split(":")[0])
        self.batch_size = positive_batch_size(batch_size)
        self.tok = Tokenizer.load(self.loaded.cfg.data.tokenizer)
        self.max_length = self.loaded.cfg.model.max_seq_len
        self._device = self.loaded.device.torch_device

    # -- tokens ---------------------------------------------------------------------------------

    @property
    def prefix_token_id(self) -> int:
        return self.tok.eos_id

    def split_tokens(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids with the document prefix, continuation ids). Trailing spaces of the context
        belong to the continuation, as the harness expects."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if not context:
            return [self.prefix_token_id], self.tok.encode(continuation)
        whole = self.tok.encode(context + continuation)
        n_context = len(self.tok.encode(context))
        return [self.prefix_token_id] + whole[:n_context], whole[n_context:]

    # -- scoring --------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]], desc: str = "") -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy choice) for each pair of token
        lists, keeping only the last max_length tokens of context + continuation as input."""
        for _, continuation in pairs:
            if not continuation:
                raise UserError("lm_eval: a request has an empty continuation (nothing to score)")
            if len(continuation) > self.max_length:
                raise UserError(f"lm_eval: a continuation of {len(continuation)} tokens does not fit the "
                                f"model's context (model.max_seq_len={self.max_length})")
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc=desc or "loglikelihood", unit="req", disable=len(pairs) < 2)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            seqs = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):] for i in chunk]
            width = max(len(s) for s in seqs) - 1
            x = torch.full((len(seqs), width), self.prefix_token_id, dtype=torch.long)
            for row, s in enumerate(seqs):
                x[row, :len(s) - 1] = torch.tensor(s[:-1])
            with self.loaded.device.autocast(self.loaded.recipe.autocast_dtype):
                logits = self.loaded.model(x.to(self._device))
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, i in enumerate(chunk):
                n, target = len(pairs[i][1]), torch.tensor(pairs[i][1])
                end = len(seqs[row]) - 1
                rows = logp[row, end - n:end]
                results[i] = (float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all()))
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.split_tokens(*r.args) for r in requests]
        out = self.score(pairs, "loglikelihood")
        for r, o in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", r.args, o)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in tqdm(requests, desc="loglikelihood_rolling", unit="doc", disable=disable_tqdm or len(requests) < 2):
            (text,) = r.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok.encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(lp for lp, _ in self.score(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in tqdm(requests, desc="generate_until", unit="req", disable=disable_tqdm or len(requests) < 2):
            context, kwargs = r.args
            g = GenerationArgs.parse(dict(kwargs or {}))
            ids = [self.prefix_token_id] + self.tok.encode(context)  # cut to the window as it decodes

            def reached_stop(new: list[int], ids=ids, until=g.until) -> bool:
                return any(u in decode_continuation(self.tok, ids, new) for u in until)

            gen = torch.Generator().manual_seed(g.seed)
            new = continue_tokens(self.loaded, ids, g.max_gen_toks, g.temperature, g.top_k, gen, reached_stop)
            text = decode_continuation(self.tok, ids, [t for t in new if t != self.tok.eos_id])
            for u in g.until:
                text = text.split(u)[0]
            self.cache_hook.add_partial("generate_until", r.args, text)
            out.append(text)
        return out


def positive_batch_size(value: int | str) -> int:
    try:
        size = int(value)
    except ValueError:
        raise UserError(f"batch_size: expected a positive integer, got {value!r} ('auto' is not supported)") from None
    if size < 1:
        raise UserError(f"batch_size: expected a positive integer, got {value!r}")
    return size


@dataclass
class GenerationArgs:
    """A task's generation_kwargs. Greedy unless do_sample is true (the harness's HF convention);
    arguments we do not implement are refused unless they are at their no-op value."""

    until: list[str]
    max_gen_toks: int = 256
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0

    NO_OP = {"num_beams": 1, "top_p": 1.0}

    @classmethod
    def parse(cls, kwargs: dict) -> GenerationArgs:
        kwargs = dict(kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature, top_k = float(kwargs.pop("temperature", 1.0)), int(kwargs.pop("top_k", 0) or 0)
        if not do_sample:  # greedy: temperature, top_k and top_p cannot change the result
            temperature, top_k = 0.0, 0
            kwargs.pop("top_p", None)
        args = cls(until=until, max_gen_toks=int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", 256))),
                   temperature=temperature, top_k=top_k, seed=int(kwargs.pop("seed", 0)))
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and cls.NO_OP.get(k) != v)
        if unsupported:
            raise UserError(f"generate_until: unsupported generation arguments {unsupported} (supported: until, "
                            "max_gen_toks, do_sample, temperature, top_k, seed; num_beams=1, top_p=1.0)")
        return args


def run_tasks(path: Path, tasks: list[str], num_fewshot: int | None = None, limit: float | None = None,
              batch_size: int = 1, include_path: list[str] | None = None, bf16: bool = True,
              seed: int = 1234, bootstrap_iters: int = 1000) -> dict:
    """Run lm_eval `tasks` on the checkpoint in its training precision and (bf16=True) in BF16 too;
    written to RUN/eval/step_N_tasks.json."""
    from lm_eval.tasks import TaskManager

    positive_batch_size(batch_size)  # before the slow part: loading the model and indexing the tasks
    missing = [d for d in include_path or [] if not Path(d).is_dir()]
    if missing:
        raise UserError(f"--include-path: not a folder: {', '.join(missing)}")
    trained = load_model(path)
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        raise UserError(f"--tasks: unknown lm_eval task(s) {unknown}; see `lm_eval --tasks list`, or give "
                        "--include-path DIR holding your task YAMLs")
    precisions = {trained.recipe.name: trained}
    if bf16 and trained.recipe.name != "bf16":
        precisions["bf16"] = load_model(path, precision="bf16")
    result: dict = {"checkpoint": str(trained.checkpoint), "step": trained.step, "tasks": tasks,
                    "num_fewshot": num_fewshot, "limit": limit, "lm_eval_version": lm_eval.__version__,
                    "trained_precision": trained.recipe.name, "results": {}}
    for name, loaded in precisions.items():
        try:
            out = lm_eval.simple_evaluate(model=HarnessLM(loaded=loaded, batch_size=batch_size), tasks=tasks,
                                          num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                          log_samples=False, bootstrap_iters=bootstrap_iters, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        except ConnectionError as e:  # the datasets library's "Couldn't reach ... on the Hub"
            raise UserError(f"--tasks: {e}. Standard tasks download their data from the Hugging Face Hub: run on a "
                            "connected machine, or fill the HF cache there first and set HF_DATASETS_OFFLINE=1, or "
                            "write a task YAML over local files and pass --include-path DIR") from None
        result["results"][name] = _clean(out["results"])
    out_dir = trained.checkpoint.parent.parent / "eval"
    out_dir.mkdir(exist_ok=True)
    written = out_dir / f"step_{trained.step}_tasks.json"
    write_text_atomic(written, json.dumps(result, indent=1))
    result["written"] = str(written)
    return result


def _clean(results: dict) -> dict:
    """{task: {metric: value}} with lm_eval's 'acc,none' keys shortened to 'acc' and its 'N/A' stderrs
    dropped, so the JSON and the table read plainly."""
    clean = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if key == "alias" or not isinstance(value, (int, float)):
                continue
            row[metric if filt in ("", "none") else f"{metric} ({filt})"] = value
        clean[task] = row
    return clean


def tasks_table(result: dict) -> str:
    """A markdown table: one row per task and metric, a column per precision, and their difference."""
    names = list(result["results"])
    header = ["task", "metric", *names] + ([f"bf16 - {names[0]}"] if len(names) == 2 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    first = result["results"][names[0]]
    for task, metrics in first.items():
        for metric in metrics:
            if metric.endswith("_stderr") or metric == "sample_len":  # sample_len: documents evaluated
                continue
            values = [result["results"][n].get(task, {}).get(metric) for n in names]
            stderrs = [result["results"][n].get(task, {}).get(f"{metric}_stderr") for n in names]
            n = f" (n={int(metrics['sample_len'])})" if "sample_len" in metrics else ""
            cells = [task + n, metric] + [_fmt(v, e) for v, e in zip(values, stderrs, strict=True)]
            if len(names) == 2 and None not in values:
                cells.append(f"{values[1] - values[0]:+.4f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else "")
