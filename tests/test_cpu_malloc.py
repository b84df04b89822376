"""The CPU allocator setting (device/cpu_malloc.py): a fixed glibc mmap threshold really returns freed
tensors to the OS, where glibc's dynamic default keeps them in its heap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lowp.device import get_device
from megatron_lowp.device.cpu_malloc import ENV, _glibc, set_mmap_threshold

REPO = Path(__file__).resolve().parents[1]

# In a fresh process: free a 4 MiB tensor (mmap'ed, so glibc's dynamic threshold rises to 4 MiB), then
# allocate 1 MiB and report whether it was mmap'ed (mallinfo2's hblkhd grows) or taken from the heap.
PROBE = """
import ctypes, sys, torch
from megatron_lowp.device.cpu_malloc import set_mmap_threshold
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
set_mmap_threshold(int(sys.argv[1]))
a = torch.empty(4 << 20, dtype=torch.uint8); a.fill_(1); del a
before = libc.mallinfo2().hblkhd
b = torch.empty(1 << 20, dtype=torch.uint8); b.fill_(1)
print(libc.mallinfo2().hblkhd - before >= 1 << 20)
"""


def _has_mallinfo2() -> bool:
    libc = _glibc()
    return libc is not None and hasattr(libc, "mallinfo2")


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
@pytest.mark.parametrize("kib, mmapped", [(0, "False"), (64, "True")])
def test_a_fixed_threshold_returns_freed_tensors_to_the_os(kib, mmapped, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    out = subprocess.run([sys.executable, "-c", PROBE, str(kib)], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == mmapped  # 0: glibc's dynamic default serves the 1 MiB from its heap


def test_the_setting_says_what_it_did(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert set_mmap_threshold(0) is None and set_mmap_threshold(None) is None
    if _glibc() is not None:
        assert "64 KiB" in set_mmap_threshold(64)
    monkeypatch.setenv(ENV, "131072")
    assert "131072 bytes" in set_mmap_threshold(64) and ENV in set_mmap_threshold(64)  # the environment wins
    assert get_device("cpu").tune_host_allocator(64) == set_mmap_threshold(64)
