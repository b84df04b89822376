"""What the GPU scripts (device_check.py, device_fidelity.py) share: a wall-clock budget, time-boxed
steps run as child processes with their logs, a description of the machine, markdown tables and
the output folder with its bundle.

The scripts run where the package may not be installed and nothing can be downloaded: every child
gets the repository on PYTHONPATH, so `python -m megatron_lowp` and the scripts work either way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_RETURNED_FILES = 8  # what comes back from the device machine's output folder


def output_folder(requested: str | None, kind: str) -> Path:
    """--out, else $OUT (the device machine's return folder), else bench/<kind>-<date>-<time>."""
    out = Path(requested or os.environ.get("OUT") or REPO / "bench" / time.strftime(f"{kind}-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    return out


class Budget:
    """Seconds of wall clock for the whole script; steps ask it how long they may take."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


@dataclass
class Step:
    """One time-boxed child process and what became of it."""

    name: str
    command: list[str]
    status: str = "not run"  # ok | failed | timed out | skipped | not run
    seconds: float = 0.0
    timeout_s: float = 0.0
    returncode: int | None = None
    log: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        return asdict(self)


def child_env(dry_run: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: the repository importable, and on a dry run one thread per
    process and no CPU torch.compile (tiny shapes; a compile would cost more than it saves)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("MEGATRON_LOWP_CACHE", str(REPO / ".cache"))
    env["PYTHONUNBUFFERED"] = "1"
    if dry_run:
        env.setdefault("OMP_NUM_THREADS", "1")
        env["MEGATRON_LOWP_CPU_COMPILE"] = "0"
    env.update(extra or {})
    return env


def run_step(step: Step, timeout_s: float, log_dir: Path, env: dict[str, str], echo: bool = True) -> Step:
    """Run step.command with its output in log_dir/<name>.log; past timeout_s the whole process
    group is ended (SIGTERM, then SIGKILL), so one hung step cannot eat the budget."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{step.name}.log"
    step.log, step.timeout_s = str(log), timeout_s
    if timeout_s <= 0:
        step.status, step.note = "skipped", "no time left in the budget"
        return _echo(step, echo)
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(step.command) + "\n")
        f.flush()
        proc = subprocess.Popen(step.command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            step.returncode = proc.wait(timeout=timeout_s)
            step.status = "ok" if step.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _end_group(proc)
            step.status, step.note = "timed out", f"ended after {timeout_s:.0f} s"
    step.seconds = time.monotonic() - start
    return _echo(step, echo)


def run_steps(steps: list[Step], timeout_at_start: Callable[[Step], float], workers: int, log_dir: Path,
              env: dict[str, str]) -> list[Step]:
    """run_step for each step, `workers` at a time, in order; each step's time box is decided when it
    starts (so with one worker a step gets what the ones before it left)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_step(s, timeout_at_start(s), log_dir, env), steps))


def _end_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _echo(step: Step, echo: bool) -> Step:
    if echo:
        note = f" ({step.note})" if step.note else ""
        print(f"[{step.status:>9}] {step.name}: {step.seconds:.1f} s{note}", flush=True)
    return step


def log_tail(step: Step, lines: int = 15) -> str:
    try:
        return "\n".join(Path(step.log).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def python() -> list[str]:
    return [sys.executable]


MACHINE_PROBE = """
import json, os, platform, torch
from megatron_lowp.device import get_device
d = get_device("auto")
caps = d.capabilities
info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
        "cpus": os.cpu_count(), "device": caps.name, "device_type": d.type,
        "native_fp8_gemm": caps.native_fp8_gemm, "native_fp4_gemm": caps.native_fp4_gemm,
        "peak_bf16_tflops": caps.peak_bf16_flops / 1e12 if caps.peak_bf16_flops else None,
        "torch_cuda": torch.version.cuda}
for name in ("triton", "pytest"):
    try:
        info[name] = __import__(name).__version__
    except ImportError:
        info[name] = None
if d.type == "cuda":
    p = torch.cuda.get_device_properties(d.index)
    info.update(gpu_memory_gib=round(p.total_memory / 2**30, 1), compute_capability=f"{p.major}.{p.minor}")
print("MACHINE " + json.dumps(info))
"""


def machine_info(log_dir: Path, env: dict[str, str], timeout_s: float = 90) -> tuple[dict, Step]:
    """Versions and the device as the package sees it, from a child (the parent never touches the GPU)."""
    step = run_step(Step("machine", [*python(), "-c", MACHINE_PROBE]), timeout_s, log_dir, env)
    info: dict = {}
    if step.status == "ok":
        for line in Path(step.log).read_text(encoding="utf-8").splitlines():
            if line.startswith("MACHINE "):
                info = json.loads(line[len("MACHINE "):])
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info, step


def markdown_table(rows: list[dict], columns: list[tuple]) -> str:
    """A markdown table of rows; columns are (key, header) or (key, header, format spec); floats
    without a spec get a sensible width."""
    def cell(v, spec: str | None) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if spec:
                return format(v, spec)
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 0.01 else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c[0]), c[2] if len(c) > 2 else None) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def check_row(what: str, target: str, value: float | None, ok: bool | None, shown: str) -> dict:
    """One line of a targets table: met / missed / n/a (not measured here)."""
    return {"check": what, "target": target, "value": value, "measured": shown if value is not None else "-",
            "status": "n/a" if ok is None or value is None else ("met" if ok else "missed")}


CHECK_COLUMNS = [("check", "check"), ("target", "target"), ("measured", "measured"), ("status", "status")]


def bundle(out: Path, name: str, root: Path, items: list[Path]) -> Path:
    """items (files or folders under root) as out/<name>.tar.gz, paths relative to root."""
    path = out / f"{name}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for item in items:
            if item.exists():
                tar.add(item, arcname=str(item.relative_to(root)))
    return path


def check_file_count(out: Path) -> None:
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > MAX_RETURNED_FILES:
        print(f"warning: {len(files)} files in {out}; only {MAX_RETURNED_FILES} come back from the device machine")
