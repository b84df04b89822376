"""The C allocator under CPU tensors, and why a training step's peak RSS depends on it.

On the CPU, PyTorch takes tensor memory from the C library's malloc. glibc serves a request above
its mmap threshold (128 KiB at start) with its own mmap, returned to the OS on free; below it, from a
heap that is reused but rarely given back. The threshold is dynamic: each time an mmap'ed block is
freed, glibc raises the threshold to that block's size (up to 32 MiB). After the first few
activations are freed, most of a step's tensors come from the heap, and the heap grows to the
high-water mark of every size mix the step ever had. Quantized recipes allocate many short-lived
buffers of mixed sizes (FP32 copies, SR uniforms, codes, scales), so their heap fragments more:
on the tiny preset their one-step peak RSS was above BF16's although their tensors were smaller
(docs/memory.md).

A fixed threshold (`mallopt(M_MMAP_THRESHOLD, n)`, which also turns the dynamic raise off) sends
every tensor of n bytes or more back to the OS when it is freed, so the peak follows the tensors.
`device.cpu_mmap_threshold_kib` sets it when the process starts training; `MALLOC_MMAP_THRESHOLD_`
in the environment (glibc's own switch) takes precedence, and 0 leaves glibc's dynamic default.
Nothing numeric changes: only where the bytes live.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
ENV = "MALLOC_MMAP_THRESHOLD_"


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def set_mmap_threshold(kib: int | None) -> str | None:
    """Fix glibc's mmap threshold at `kib` KiB (None or 0: leave it); a line saying what was done."""
    if os.environ.get(ENV):
        return f"CPU allocator: mmap threshold {os.environ[ENV]} bytes ({ENV} from the environment)"
    if not kib:
        return None
    libc = _glibc()
    if libc is None:
        return f"device.cpu_mmap_threshold_kib = {kib}: ignored, this C library is not glibc"
    if libc.mallopt(M_MMAP_THRESHOLD, kib * 1024) != 1:
        return f"device.cpu_mmap_threshold_kib = {kib}: glibc refused it (mallopt returned 0); glibc's default stays"
    return f"CPU allocator: tensors of {kib} KiB or more are returned to the OS when freed (device.cpu_mmap_threshold_kib)"
