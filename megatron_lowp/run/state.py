"""Checkpoint state as tensors and JSON, never as pickles.

A training state (model, optimizer, RNG) is a tree of dicts and lists whose leaves are tensors and
small Python values (an optimizer's param groups: lr, betas, eps, parameter names...).
torch.distributed.checkpoint would store each non-tensor leaf as a pickle, and pickles run code when
they are loaded. So a state is split before saving:

- `tensor_tree(state)`: the same tree holding only the tensor leaves (DTensor and ShardedTensor
  included), which DCP saves as tensor data and loads in place;
- `json_leaves(state)`: every other leaf as [path, value] pairs, written to `state.json` beside the
  DCP files (tuples become lists; a non-finite float or a value that is not JSON is an error).

`restore_json_leaves(state, leaves)` puts the saved values back into a template state (the one the
caller built for this model and optimizer), turning lists back into tuples where the template
holds a tuple.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from megatron_lowp.errors import UserError

_SCALARS = (str, int, float, bool, type(None))


def _is_json_value(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, _SCALARS):
        return True
    if isinstance(v, (list, tuple)):
        return all(_is_json_value(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_json_value(x) for k, x in v.items())
    return False


def _holds_tensors(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, dict):
        return any(_holds_tensors(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_holds_tensors(x) for x in v)
    return False


def _walk(node: Any, path: list):
    """(path, leaf) for every leaf, path being dict keys (str) and list indices (int); a container
    without tensors inside counts as one leaf."""
    if isinstance(node, dict) and _holds_tensors(node):
        for k, v in node.items():
            yield from _walk(v, [*path, k])
    elif isinstance(node, list) and _holds_tensors(node):
        for i, v in enumerate(node):
            yield from _walk(v, [*path, i])
    else:
        yield path, node


def tensor_tree(state: dict) -> dict:
    """`state` with only its tensor leaves (same nesting; lists become dicts keyed by index)."""
    out: dict = {}
    for path, leaf in _walk(state, []):
        if not isinstance(leaf, torch.Tensor):
            continue
        node = out
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = leaf
    return out


def json_leaves(state: dict) -> list[list]:
    """Every non-tensor leaf as [path, value]; raises ValueError for a value JSON cannot hold."""
    leaves = []
    for path, leaf in _walk(state, []):
        if isinstance(leaf, torch.Tensor):
            continue
        if not _is_json_value(leaf):
            where = ".".join(map(str, path))
            raise ValueError(f"checkpoint state '{where}' holds a {type(leaf).__name__}, which is neither a tensor "
                             "nor a JSON value")
        leaves.append([path, leaf])  # json writes a tuple as a list
    return leaves


def _valid_path(path: Any) -> bool:
    return isinstance(path, list) and bool(path) and all(
        isinstance(p, str) or (isinstance(p, int) and not isinstance(p, bool) and p >= 0) for p in path)


def restore_json_leaves(state: dict, leaves: Any, where: str) -> None:
    """Put saved non-tensor values into the template `state` (in place); like DCP, only the top-level
    sections the template has are filled."""
    if not isinstance(leaves, list):
        raise UserError(f"{where}: expected a list of [path, value] pairs")
    for item in leaves:
        if not (isinstance(item, list) and len(item) == 2 and _valid_path(item[0]) and _is_json_value(item[1])):
            raise UserError(f"{where}: malformed entry {str(item)[:200]}")
        path, value = item
        if path[0] not in state:
            continue  # a section the caller did not ask for (e.g. eval loads the model, not the optimizer)
        node = state
        for key in path[:-1]:
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                raise UserError(f"{where}: '{'.'.join(map(str, path))}' does not fit this model/optimizer") from None
        last = path[-1]
        if isinstance(node, list):
            if not isinstance(last, int) or last >= len(node):
                raise UserError(f"{where}: '{'.'.join(map(str, path))}' does not fit this model/optimizer")
        elif not isinstance(node, dict):
            raise UserError(f"{where}: '{'.'.join(map(str, path))}' does not fit this model/optimizer")
        old = node[last] if (isinstance(node, list) or last in node) else None
        if isinstance(old, torch.Tensor):
            raise UserError(f"{where}: '{'.'.join(map(str, path))}' is a tensor in this model/optimizer, "
                            "not a value")
        node[last] = tuple(value) if isinstance(old, tuple) and isinstance(value, list) else value
