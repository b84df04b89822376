"""Saved-tensor accounting: every tensor autograd keeps for backward during one forward, attributed to
the module that saved it and, for a linear, to its GEMM role. The memory ledger's activation rows come
from here, in the prediction (a forward on fake tensors, memory/predict.py) and in the trainer's
measurement (a real forward, memory/measure.py) alike.

- A tensor is counted once per storage (views and tensors saved by two ops share it), at the storage's
  size when the forward ends (FSDP frees an all-gathered weight's storage after the forward: 0 bytes).
  Storages of parameters are not counted: they are in the ledger's `parameters`.
- Roles: `x_t` the input a linear keeps for wgrad, `w_t` the weight copy it keeps for dgrad (the
  quantized linear tags both, in their stored formats; a plain linear's are told apart by shape),
  `held` an input a checkpointed region keeps (model/checkpointing.py), `other` everything else
  (norms, attention, activations, the loss), attributed to its transformer block or top-level module.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from megatron_lowp.model.checkpointing import observe_held_inputs


def _storage(t: torch.Tensor) -> torch.UntypedStorage:
    return getattr(t, "_local_tensor", t).untyped_storage()


def _key(t: torch.Tensor) -> int:
    return _storage(t)._cdata


@dataclass
class SavedRow:
    where: str  # "layers.0.attn.qkv", "layers.0" (a block's other tensors), "lm_head", "loss", ...
    role: str  # x_t, w_t, held, other
    fmt: str  # the stored format (fp8_e5m2, nvfp4) or dtype (bfloat16, float32)
    bytes: int

    def as_dict(self) -> dict:
        return {"where": self.where, "role": self.role, "format": self.fmt, "bytes": self.bytes}


class SavedTensors:
    """Context manager: records what `model`'s forward (and the loss after it) saves for backward."""

    def __init__(self, model: nn.Module):
        self.names = {m: n for n, m in model.named_modules()}
        self.blocks = {m: n for m in getattr(model, "layers", []) for n in [self.names[m]]}
        self.params = {_key(p) for p in model.parameters()}
        self.stack: list[nn.Module] = []
        self.entries: dict[int, tuple[str, str, str, torch.UntypedStorage]] = {}
        self.rows: list[SavedRow] = []
        self._exit = contextlib.ExitStack()

    # --- where a tensor is saved --------------------------------------------------------------------
    def _pre(self, module, args) -> None:
        if module in self.names:
            self.stack.append(module)

    def _post(self, module, args, out) -> None:
        if module in self.names and self.stack and self.stack[-1] is module:
            self.stack.pop()

    def _place(self) -> str:
        """The innermost transformer block on the stack, else the top-level module, else the loss."""
        for module in reversed(self.stack):
            if module in self.blocks:
                return self.blocks[module]
        if not self.stack:
            return "loss"  # saved after the model's forward: the cross-entropy
        return next((self.names[m].split(".")[0] for m in self.stack if self.names[m]), "model")

    def _classify(self, t: torch.Tensor) -> tuple[str, str, str]:
        fmt = str(t.dtype).replace("torch.", "")
        module = self.stack[-1] if self.stack else None
        role = getattr(t, "_lowp_role", None)
        if role is not None and module is not None:
            spec = getattr(getattr(module, "specs", None), role, None)
            return self.names[module], role, spec.fmt if spec is not None else fmt
        if isinstance(module, nn.Linear):  # F.linear saves the (autocast) weight as a transposed view, and the input
            out_features, in_features = module.weight.shape
            weight = tuple(t.shape) == (in_features, out_features) and t.stride() == (1, in_features)
            return self.names[module], "w_t" if weight else "x_t", fmt
        return self._place(), "other", fmt

    def _add(self, t: torch.Tensor, where: str, role: str, fmt: str) -> None:
        """The first saver names a storage, except that a linear's role wins over any other (e.g. the
        attention output that the output projection keeps as its input is that linear's x_t)."""
        key = _key(t)
        if key in self.params:
            return
        if key not in self.entries or (role in ("x_t", "w_t") and self.entries[key][1] not in ("x_t", "w_t")):
            self.entries[key] = (where, role, fmt, _storage(t))

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._add(t, *self._classify(t))
        return t

    def _held(self, t: torch.Tensor) -> None:
        self._add(t, self._place(), "held", str(t.dtype).replace("torch.", ""))

    # --- the context --------------------------------------------------------------------------------
    def __enter__(self) -> SavedTensors:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._exit.callback(register_module_forward_pre_hook(self._pre).remove)
        self._exit.callback(register_module_forward_hook(self._post, always_call=True).remove)
        self._exit.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        self._exit.enter_context(observe_held_inputs(self._held))
        return self

    def __exit__(self, *exc) -> None:
        self._exit.close()
        totals: dict[tuple[str, str, str], int] = defaultdict(int)
        for where, role, fmt, storage in self.entries.values():
            totals[(where, role, fmt)] += storage.nbytes()
        self.rows = [SavedRow(w, r, f, b) for (w, r, f), b in totals.items()]
        self.entries = {}
