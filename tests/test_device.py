"""The device abstraction, and the rule that nothing else in the package branches on device types."""

import re
from pathlib import Path

import pytest
import torch

import megatron_lowp
from megatron_lowp.device import DEVICE_TYPES, get_device, resolve_device_type
from megatron_lowp.errors import UserError


def test_auto_picks_cpu_without_accelerators():
    if torch.cuda.is_available():  # noqa: the test file, not the package
        pytest.skip("a GPU is present")
    dev = get_device("auto")
    assert dev.type == "cpu" and dev.dist_backend == "gloo"
    assert dev.torch_device == torch.device("cpu")
    caps = dev.capabilities
    assert caps.fp8_e4m3_max == 448.0 and not caps.native_fp4_gemm
    assert dev.supports_autocast(torch.bfloat16) and not dev.supports_autocast(torch.float16)
    assert dev.memory_stats()["peak_rss"] > 10 * 2**20


def test_autocast_context_computes_in_bf16():
    dev = get_device("cpu")
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with dev.autocast(torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with dev.autocast(None):
        assert (a @ b).dtype == torch.float32


def test_rng_state_round_trip():
    dev = get_device("cpu")
    dev.manual_seed(7)
    state = dev.get_rng_state()
    first = torch.rand(5)
    dev.set_rng_state(state)
    assert torch.equal(first, torch.rand(5))


def test_unknown_and_missing_devices():
    with pytest.raises(UserError, match="device.type: 'tpu' is not one of auto, cpu, cuda, hpu"):
        resolve_device_type("tpu")
    with pytest.raises(UserError, match=r"habana_frameworks.torch.*not installed"):
        get_device("hpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="torch sees no CUDA GPU"):
            get_device("cuda")
    assert DEVICE_TYPES == ("auto", "cpu", "cuda", "hpu")


def test_capability_tables():
    from megatron_lowp.device.cuda import cuda_capabilities
    from megatron_lowp.device.hpu import hpu_capabilities

    a100, h100, b200 = (cuda_capabilities(cc, True, n) for cc, n in [((8, 0), "A100"), ((9, 0), "H100"), ((10, 0), "B200")])
    assert (a100.native_fp8_gemm, h100.native_fp8_gemm, b200.native_fp8_gemm) == (False, True, True)
    assert (a100.native_fp4_gemm, h100.native_fp4_gemm, b200.native_fp4_gemm) == (False, False, True)
    assert cuda_capabilities((8, 9), True, "L4").native_fp8_gemm  # Ada has FP8 tensor cores
    assert cuda_capabilities((7, 5), False, "T4").autocast_dtypes == (torch.float16,)
    assert hpu_capabilities("GAUDI2").fp8_e4m3_max == 240.0
    assert hpu_capabilities("GAUDI3").fp8_e4m3_max == 448.0


# Device names and device-specific APIs may only appear inside megatron_lowp/device/.
FORBIDDEN = [
    re.compile(r"""["']cuda(:\d+)?["']"""),
    re.compile(r"""["']hpu(:\d+)?["']"""),
    re.compile(r"\btorch\.cuda\b"),
    re.compile(r"\btorch\.hpu\b"),
    re.compile(r"\bhabana_frameworks\b"),
    re.compile(r"\.cuda\("),
]


def device_leaks(package_root: Path) -> list[str]:
    leaks = []
    for path in sorted(package_root.rglob("*.py")):
        if "device" in path.relative_to(package_root).parts[:1]:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if any(p.search(line) for p in FORBIDDEN):
                leaks.append(f"{path.relative_to(package_root.parent)}:{number}: {line.strip()}")
    return leaks


def test_no_device_branching_outside_device_package():
    leaks = device_leaks(Path(megatron_lowp.__file__).parent)
    assert not leaks, "device-specific code outside megatron_lowp/device/:\n" + "\n".join(leaks)


def test_the_scan_catches_a_leak(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "device").mkdir(parents=True)
    (pkg / "device" / "ok.py").write_text("import torch\ntorch.cuda.synchronize()\n")
    (pkg / "model.py").write_text("if x.device.type == 'cuda':\n    pass\n")
    (pkg / "loop.py").write_text("torch.cuda.synchronize()\n")
    leaks = device_leaks(pkg)
    assert [leak.split(": ")[0] for leak in leaks] == ["pkg/loop.py:1", "pkg/model.py:1"]
