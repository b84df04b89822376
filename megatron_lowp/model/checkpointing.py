"""Activation checkpointing per transformer block: `train.activation_checkpointing: none | full | selective`.

- full: each block of `model.layers` runs under torch.utils.checkpoint (non-reentrant). Only the
  block's input is kept; backward runs the block's forward again, linears included, to rebuild the rest.
- selective: every linear keeps what it saves for backward (the packed FP8/FP4 operands of quantized
  roles, 1 or 0.56 bytes per value; the BF16/FP32 input of high-precision ones), and the parts between
  the linears are recomputed: the norms, the attention core (RoPE and softmax(QK^T)V) and the MLP
  gating. Their intermediates are FP32 (norms, RoPE) and BF16 tensors, most of a block's activation
  bytes, and redoing them costs no GEMM and no quantization. A model marks these parts by calling
  `recompute(fn, *args)`; outside a selective block (and without gradients) it is just fn(*args).

Recomputed forwards of quantized linears replay what the first forward used (precision/recompute.py:
SR offsets, delayed scales; no second amax observation or telemetry count), so checkpointing changes
no bit of the losses, the amax histories or the SR streams. Evaluation and generation (no gradients)
run the plain forward.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_lowp.precision.recompute import region_contexts

MODES = ("none", "full", "selective")

_local = threading.local()
# Callbacks shown the tensors each checkpointed region holds until its backward (its inputs): what
# autograd's saved-tensor hooks do not see, and the memory ledger counts (memory/saved.py).
_held_observers: list = []


@contextlib.contextmanager
def observe_held_inputs(callback):
    """While active, callback(tensor) for every tensor input a new checkpointed region keeps."""
    _held_observers.append(callback)
    try:
        yield
    finally:
        _held_observers.remove(callback)


def _checkpointed(fn, *args, **kwargs):
    for callback in _held_observers:
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                callback(a)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=region_contexts, **kwargs)


@contextlib.contextmanager
def _selective():
    depth = getattr(_local, "selective", 0)
    _local.selective = depth + 1
    try:
        yield
    finally:
        _local.selective = depth


def recompute(fn, *args):
    """fn(*args); inside a block under selective checkpointing, with gradients on, its intermediates
    are not kept but recomputed in backward (only its inputs are)."""
    if not getattr(_local, "selective", 0) or not torch.is_grad_enabled():
        return fn(*args)
    return _checkpointed(fn, *args)


def _full_forward(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return _checkpointed(forward, *args, **kwargs)


def _selective_forward(forward, *args, **kwargs):
    with _selective():
        return forward(*args, **kwargs)


_FORWARDS = {"full": _full_forward, "selective": _selective_forward}


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Checkpoint every block of `model.layers` (the model contract) the way `mode` says. The blocks
    stay the same modules (same parameter names, same FSDP units); only their forward is wrapped."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing {mode!r}: allowed {', '.join(MODES)}")
    if mode == "none":
        return
    for block in model.layers:
        block.forward = functools.partial(_FORWARDS[mode], block.forward)
        block.activation_checkpointing = mode


def checkpointing_of(block: nn.Module) -> str:
    """How `block` is checkpointed: none, full or selective."""
    return getattr(block, "activation_checkpointing", "none")
