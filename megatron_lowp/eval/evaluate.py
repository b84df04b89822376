"""Load a trained model from a checkpoint, and use it: validation loss and perplexity (in the
precision it was trained in and, for comparison, in BF16), and text generation.

`load_model(path, precision=None)` accepts a run directory (its newest complete checkpoint) or a
checkpoint directory; the checkpoint is verified against its manifest, and the recipe is the one
saved in its meta.json, so the model is rebuilt exactly as it was trained. Only the model's tensors
are read (not the optimizer's). `precision="bf16"` rebuilds the same weights with plain BF16
linears: the difference between the two losses is what the low-precision forward costs at
inference.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from megatron_lowp.config import Config, config_to_dict, load_config
from megatron_lowp.data import Tokenizer, build_validation_set, sequence_losses
from megatron_lowp.device import Device, get_device, set_cpu_threads
from megatron_lowp.errors import UserError
from megatron_lowp.model import build_model
from megatron_lowp.model.kv_cache import KVCache
from megatron_lowp.precision import PrecisionRecipe, available_recipes, build_recipe
from megatron_lowp.run.atomic import write_text_atomic
from megatron_lowp.run.checkpoint import meta_value, verify
from megatron_lowp.run.run_dir import find_checkpoint
from megatron_lowp.run.safe_load import load_state


@dataclass
class Loaded:
    checkpoint: Path
    cfg: Config
    model: torch.nn.Module
    recipe: PrecisionRecipe
    device: Device
    step: int


def _config_of(meta: dict, precision: str | None, checkpoint: Path) -> Config:
    """The recipe the checkpoint was trained with (from its meta.json), optionally in another precision."""
    saved = copy.deepcopy(meta_value(meta, "config", dict, checkpoint))
    if not all(isinstance(saved.get(k), dict) for k in ("run", "precision")):
        raise UserError(f"{checkpoint}/meta.json: 'config' is damaged (no run/precision sections)")
    if precision is not None:
        saved["precision"] = {"recipe": precision, "smooth_swiglu": saved["precision"].get("smooth_swiglu", False),
                              "smooth_swiglu_granularity": saved["precision"].get("smooth_swiglu_granularity", "token")}
    saved["run"]["resume"] = "never"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(saved, f)
    try:
        return load_config(f.name, extra_choices={"precision.recipe": available_recipes()})
    finally:
        Path(f.name).unlink()


def load_model(path: Path, precision: str | None = None, device_type: str = "auto") -> Loaded:
    checkpoint = find_checkpoint(path)
    meta = verify(checkpoint)
    cfg = _config_of(meta, precision, checkpoint)
    device = get_device(device_type if device_type != "auto" else cfg.device.type)
    set_cpu_threads(cfg.device.cpu_threads)
    recipe = build_recipe(cfg, device)
    model = build_model(cfg.model, recipe).to(device.torch_device)
    state = {"model": get_model_state_dict(model)}
    load_state(checkpoint, state)  # run/safe_load.py: tensors only, no pickles
    set_model_state_dict(model, state["model"])
    model.eval()
    return Loaded(checkpoint, cfg, model, recipe, device, meta["step"])


@torch.no_grad()
def validation_loss(loaded: Loaded, data: str | None = None, samples: int | None = None) -> dict:
    """The loss over the recipe's validation set (data/validation.py), exactly as training computes
    it: the same sequences in the same chunks, so the number matches the run's val_loss."""
    cfg = copy.deepcopy(loaded.cfg)
    if data is not None:
        cfg.data.valid = data
    if samples is not None:
        cfg.train.eval_samples = samples
    vset = build_validation_set(cfg.data, cfg.train, Tokenizer.load(cfg.data.tokenizer).vocab_size)
    if vset is None:
        raise UserError("data.valid is null in this checkpoint's recipe: pass --data PREFIX")

    def losses_of(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(loaded.device.torch_device)
        with loaded.device.autocast(loaded.recipe.autocast_dtype):
            logits = loaded.model(batch[:, :-1])
        return sequence_losses(logits, batch[:, 1:])

    loss = vset.loss(losses_of)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": vset.tokens, "precision": loaded.recipe.name,
            "validation": vset.describe(cfg.data)}


def evaluate(path: Path, data: str | None = None, samples: int | None = None, bf16: bool = True) -> dict:
    """Validation loss/perplexity in the training precision and (bf16=True) in BF16; written to
    RUN_DIR/eval/step_N.json next to the checkpoint's run."""
    trained = load_model(path)
    result = {"checkpoint": str(trained.checkpoint), "step": trained.step,
              "data": data or trained.cfg.data.valid, "trained_precision": validation_loss(trained, data, samples)}
    if bf16 and trained.cfg.precision.recipe != "bf16":
        result["bf16"] = validation_loss(load_model(path, precision="bf16"), data, samples)
        result["bf16_minus_trained"] = result["bf16"]["loss"] - result["trained_precision"]["loss"]
    out_dir = trained.checkpoint.parent.parent / "eval"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"step_{trained.step}.json"
    write_text_atomic(out, json.dumps({**result, "config": config_to_dict(trained.cfg)}, indent=1))
    result["written"] = str(out)
    return result


@torch.no_grad()
def continue_tokens(loaded: Loaded, ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int = 0, generator: torch.Generator | None = None,
                    stop: Callable[[list[int]], bool] | None = None, use_cache: bool = True) -> list[int]:
    """The token ids that follow `ids`: greedy with temperature 0, else sampled from
    softmax(logits / temperature), optionally among the top_k tokens. Ends at EOS (which is kept),
    after max_new_tokens, or when stop(new_ids) is true.

    With use_cache (model/kv_cache.py): one forward over the prompt, then one token per step. Once
    the sequence is longer than the model's window (model.max_seq_len), the context is cut from the
    left to the window and recomputed at every step, as use_cache=False does throughout: the cut
    window's positions shift by one each step, so no cached key stays valid. In BF16/FP32 the two
    paths give the same tokens; low-precision recipes take per-tensor scales over the tokens of
    each forward, which is the new token alone with the cache (docs/eval.md)."""
    if temperature < 0 or top_k < 0 or max_new_tokens < 0:
        raise UserError("generate: temperature, top_k and max_new_tokens must be >= 0")
    eos = Tokenizer.load(loaded.cfg.data.tokenizer).eos_id
    window = loaded.cfg.model.max_seq_len
    cache = KVCache(loaded.cfg.model.n_layers, window) if use_cache else None
    seq, new = list(ids), []
    for _ in range(max_new_tokens):
        if cache is not None and len(seq) > window:
            cache = None  # past the window for good: recompute the cut window from here on
        fresh = seq[cache.offset:] if cache is not None else seq[-window:]
        x = torch.tensor([fresh], device=loaded.device.torch_device)
        with loaded.device.autocast(loaded.recipe.autocast_dtype):
            logits = loaded.model(x, cache)[0, -1].float().cpu()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        seq.append(nxt)
        new.append(nxt)
        if nxt == eos or (stop is not None and stop(new)):
            break
    return new


def decode_continuation(tok: Tokenizer, ids: list[int], new: list[int]) -> str:
    """The text of `new` as it continues `ids`. Decoding the whole sequence and cutting the prompt
    off keeps the joining whitespace that sentencepiece drops at the start of a decode."""
    return tok.decode(list(ids) + list(new))[len(tok.decode(ids)):]


def generate(loaded: Loaded, prompt: str, max_new_tokens: int = 50, temperature: float = 0.0, top_k: int = 0,
             seed: int = 0) -> str:
    """Continue `prompt` as the start of a document, i.e. after EOS, the separator the model saw before
    every document in training (see continue_tokens for the decoding rules)."""
    tok = Tokenizer.load(loaded.cfg.data.tokenizer)
    ids = tok.encode(prompt)
    if not ids:
        raise UserError("generate: the prompt is empty after tokenization")
    ids = [tok.eos_id] + ids
    gen = torch.Generator().manual_seed(seed)
    return decode_continuation(tok, ids, continue_tokens(loaded, ids, max_new_tokens, temperature, top_k, gen))
