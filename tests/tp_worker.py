"""Run under torchrun with 2 ranks (gloo): tensor-parallel pieces against the whole computation on
the same inputs, in float64 so that GEMM rounding (1e-16) cannot hide one differently quantized
element (a quantum is ~1e-2 relative). Writes the worst relative differences as JSON to argv[1], per case (argv[2:]):

    linear:<recipe>   a column- and a row-parallel quantized linear, 2 steps (delayed scales commit in between)
    model:<recipe>[:local_max][:sp]   a tiny Llama: logits and every gradient; local_max: Smooth-SwiGLU's
                      per-token max over this rank's FFN channels only (the FP8 reference code's form);
                      sp: with sequence parallelism
    ngpt:<recipe>[:relu2][:local_norm][:sp]   a tiny nGPT trained 3 AdamW steps (with its weight
                      renormalization): logits, every gradient and every parameter after each step;
                      then the norms of its weight rows/columns and of the hidden state at each
                      block's input and output (hooks). relu2: the ungated MLP; local_norm: FNGPT's
                      N(.) over this rank's channels only (the mistake the tp sum prevents)
    noise:<recipe>[:ngpt][:sp]   the gradient-noise monitor's report on a tiny Llama (or nGPT) against
                      the unsharded model's: ratio, grad_rms, noise_std, params and each layer's ratio
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from megatron_lowp.config import load_config
from megatron_lowp.device import get_device
from megatron_lowp.model import build_model, cross_entropy_loss
from megatron_lowp.parallel import tensor_parallel
from megatron_lowp.precision import QuantizedLinear, build_recipe
from megatron_lowp.precision.grad_noise import measure_gradient_noise
from megatron_lowp.precision.quantized_linear import commit_amax_histories

MODEL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden_size=128",
         "model.vocab_size=256", "precision.autocast=false"]


ROLES = ("x", "w", "dy", "w_t", "dy_t", "x_t")
# fp8_current: the fp8 recipe with current (this tensor's) amax in every role instead of delayed, and
# scales that are not powers of two (with those, FP8 values do not depend on the amax except at the
# range's ends, so a wrong amax would go unseen)
RECIPES = {"bf16": ["precision.recipe=bf16"], "fp8": ["precision.recipe=fp8"], "fp4": ["precision.recipe=fp4"],
           "ngpt_fp4": ["precision.recipe=ngpt_fp4"],
           # the LM head quantized too: a monitored weight that every tp rank holds whole
           "fp4_lm_head": ["precision.recipe=fp4", "precision.high_precision=[]"],
           "fp8_current": ["precision.recipe=fp8", *(f"precision.{r}.amax=current" for r in ROLES),
                           *(f"precision.{r}.power_of_two=false" for r in ROLES)]}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def reduce_max(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def linear_case(recipe_name: str, mesh) -> dict:
    rank = dist.get_rank()
    recipe = build_recipe(load_config(None, [*RECIPES[recipe_name], *MODEL]), get_device("cpu"))
    out = {}
    for kind in ("column", "row"):
        torch.manual_seed(0)
        whole = QuantizedLinear(64, 96, recipe.specs, name="layers.0.mlp.up").double()
        with torch.no_grad():  # rank 0's half 8x larger: a shard's own amax is not the tensor's
            whole.weight[:48] *= 8
            whole.weight[:, :32] *= 8
        part = copy.deepcopy(whole)
        n = (96 if kind == "column" else 64) // 2
        index = torch.arange(rank * n, (rank + 1) * n)
        tensor_parallel._shard(part, mesh, kind, index, 2 * n, tensor_parallel._local)
        worst = 0.0
        for _step in range(2):
            x, dy = torch.randn(32, 64, dtype=torch.float64), torch.randn(32, 96, dtype=torch.float64)
            x[:, :32] *= 8
            dy[:, :48] *= 8
            xw = x.clone().requires_grad_()
            y_whole = whole(xw)
            y_whole.backward(dy)
            y_whole = y_whole.detach()
            if kind == "column":
                xp = x.clone().requires_grad_()
                y = part(xp)
                y.backward(dy[:, index])
                dx = xp.grad.clone()
                dist.all_reduce(dx)
                diffs = [rel(y.detach(), y_whole[:, index]), rel(dx, xw.grad),
                         rel(part.weight.grad.to_local(), whole.weight.grad[index])]
            else:
                xp = x[:, index].clone().requires_grad_()
                y = part(xp)
                y.backward(dy)
                y_sum = y.detach().clone()
                dist.all_reduce(y_sum)
                diffs = [rel(y_sum, y_whole), rel(xp.grad, xw.grad[:, index]),
                         rel(part.weight.grad.to_local(), whole.weight.grad[:, index])]
            worst = max(worst, *diffs)
            commit_amax_histories(whole)
            commit_amax_histories(part, reduce_max)
            whole.weight.grad = part.weight.grad = None
        out[kind] = worst
        out[f"{kind}_sr_offset_equal"] = part.sr.offset == whole.sr.offset
    return out


def model_case(recipe_name: str, mesh, local_max: bool, sequence_parallel: bool) -> dict:
    cfg = load_config(None, [*RECIPES[recipe_name], *MODEL])
    recipe = build_recipe(cfg, get_device("cpu"))
    torch.manual_seed(0)
    whole = build_model(cfg.model, recipe).double()
    part = copy.deepcopy(whole)
    tensor_parallel.parallelize(part, mesh, sequence_parallel)
    if local_max:
        for block in part.layers:
            block.mlp.act.max_across_shards = None
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    logits_w, logits_p = whole(tokens), part(tokens)
    (logits_w.float() ** 2).mean().backward()
    (logits_p.float() ** 2).mean().backward()
    tensor_parallel.sync_sequence_parallel_grads(part)  # what the engines do before clipping
    grads = {}
    for (name, pw), (_, pp) in zip(whole.named_parameters(), part.named_parameters(), strict=True):
        gp = pp.grad.full_tensor() if isinstance(pp.grad, DTensor) else pp.grad
        grads[name] = rel(gp, pw.grad)
    return {"logits": rel(logits_p.detach(), logits_w.detach()), "grads": max(grads.values()), "per_grad": grads}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def weight_norm_error(model) -> float:
    """The worst |norm - 1| of the weight rows/columns nGPT keeps on the unit sphere (global tensors)."""
    params = dict(model.named_parameters())
    return max(float((full(params[name]).norm(dim=dim) - 1).abs().max()) for name, dim in model.weight_norm_dims().items())


def ngpt_case(recipe_name: str, mesh, flags: list[str]) -> dict:
    overrides = [*RECIPES[recipe_name], *MODEL, "model.arch=ngpt", "model.init_std=0.125"]
    cfg = load_config(None, overrides + (["model.mlp=relu2"] if "relu2" in flags else []))
    recipe = build_recipe(cfg, get_device("cpu"))
    torch.manual_seed(0)
    whole = build_model(cfg.model, recipe).double()
    part = copy.deepcopy(whole)
    tensor_parallel.parallelize(part, mesh, "sp" in flags)
    if "local_norm" in flags:
        for block in part.layers:
            block.attn.sum_across_shards = block.mlp.sum_across_shards = None
    # SGD: parameter differences stay at the gradients' (Adam's 1/sqrt(v) amplifies FP32 rounding of
    # near-zero gradients); lr large enough to move the weights well off the sphere before renormalizing
    opts = [torch.optim.SGD(m.parameters(), lr=2.0) for m in (whole, part)]
    worst = {"logits": 0.0, "grads": 0.0, "params": 0.0, "steps": [], "off_sphere_before_renorm": 0.0}
    per_grad: dict[str, float] = {}
    g = torch.Generator().manual_seed(1)
    for _step in range(3):
        tokens = torch.randint(0, 256, (2, 33), generator=g)
        logits = []
        for model in (whole, part):
            out = model(tokens[:, :-1])
            cross_entropy_loss(out, tokens[:, 1:]).backward()
            logits.append(out.detach())
        tensor_parallel.sync_sequence_parallel_grads(part)  # what the engines do before clipping
        worst["logits"] = max(worst["logits"], rel(logits[1], logits[0]))
        for (name, pw), (_, pp) in zip(whole.named_parameters(), part.named_parameters(), strict=True):
            per_grad[name] = max(per_grad.get(name, 0.0), rel(full(pp.grad), pw.grad))
        worst["steps"].append((rel(logits[1], logits[0]), max(per_grad.values())))
        for model, opt in zip((whole, part), opts, strict=True):
            opt.step()
            opt.zero_grad(set_to_none=True)
            if model is part:
                worst["off_sphere_before_renorm"] = max(worst["off_sphere_before_renorm"], weight_norm_error(part))
            model.after_optimizer_step()
        for pw, pp in zip(whole.parameters(), part.parameters(), strict=True):
            worst["params"] = max(worst["params"], rel(full(pp.detach()), pw.detach()))
    worst["grads"] = max(per_grad.values())
    # the sphere after training: weight rows/columns, and h entering and leaving every block, per token
    weight_error = weight_norm_error(part)
    hidden: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda mod, args, out: hidden.extend((args[0], out)))
             for block in part.layers]
    with torch.no_grad():
        part(tokens[:, :-1])
    for hook in hooks:
        hook.remove()
    hidden_error = max(float((h.norm(dim=-1) - 1).abs().max()) for h in hidden)
    return {**worst, "per_grad": per_grad, "weight_norm_error": weight_error, "hidden_norm_error": hidden_error,
            "hidden_states_checked": len(hidden)}


def noise_case(recipe_name: str, mesh, flags: list[str]) -> dict:
    arch = ["model.arch=ngpt", "model.init_std=0.125"] if "ngpt" in flags else []
    cfg = load_config(None, [*RECIPES[recipe_name], *MODEL, *arch])
    recipe = build_recipe(cfg, get_device("cpu"))
    torch.manual_seed(0)
    whole = build_model(cfg.model, recipe).double()
    part = copy.deepcopy(whole)
    tensor_parallel.parallelize(part, mesh, "sp" in flags)
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    reports = [measure_gradient_noise(m, lambda m=m: cross_entropy_loss(m(tokens[:, :-1]), tokens[:, 1:]))
               for m in (whole, part)]
    w, p = reports
    out = {key: abs(getattr(p, key) - getattr(w, key)) / abs(getattr(w, key)) for key in ("ratio", "grad_rms", "noise_std")}
    out["per_layer"] = max(abs(p.per_layer[k] - w.per_layer[k]) / w.per_layer[k] for k in w.per_layer)
    out["params_equal"] = p.params == w.params and list(p.per_layer) == list(w.per_layer)
    out["ratio_value"] = w.ratio
    return out


def main() -> None:
    """argv: the JSON path, then cases such as linear:fp8 or model:fp4:local_max (one launch, many cases)."""
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    result = {}
    for case in sys.argv[2:]:
        kind, recipe_name, *flags = case.split(":")
        if kind == "linear":
            result[case] = linear_case(recipe_name, mesh)
        elif kind == "ngpt":
            result[case] = ngpt_case(recipe_name, mesh, flags)
        elif kind == "noise":
            result[case] = noise_case(recipe_name, mesh, flags)
        else:
            result[case] = model_case(recipe_name, mesh, "local_max" in flags, "sp" in flags)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w", encoding="utf-8") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
