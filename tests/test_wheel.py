"""What a user installs is what we test: build the wheel, install it into a fresh environment outside
the checkout, and train 2 steps of the fp8 and fp4 tiny recipes from there.

A wheel once lost the recipe packages (configs/precision/*.yaml) and silently trained BF16 under
the name fp8; this checks that the installed package has them: quantized linears in the model and
FP8 Adam moments in the optimizer. The fresh environment takes the package from the wheel and
only the third-party dependencies (torch, ...) from the test environment (a path entry, so the
checkout's editable install is not on the path), and runs with the working directory elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
import torch
import megatron_lowp
from megatron_lowp.config import load_config
from megatron_lowp.precision import QuantizedLinear
from megatron_lowp.train.loop import Trainer

out = {"package": megatron_lowp.__file__, "runs": {}}
for name in ("fp8", "fp4"):
    cfg = load_config(sys.argv[1] + f"/recipes/tiny/{name}.yaml", sys.argv[3:] + [f"run.out_dir={sys.argv[2]}"])
    trainer = Trainer(cfg)
    result = trainer.fit()
    moments = sorted({str(v.dtype) for s in trainer.optimizer.state.values() for k, v in s.items()
                      if k in ("exp_avg", "exp_avg_sq")})
    out["runs"][name] = {"quantized_linears": sum(isinstance(m, QuantizedLinear) for m in trainer.model.modules()),
                         "moment_dtypes": moments, "steps": result.step, "loss": result.loss,
                         "smooth_swiglu": cfg.precision.smooth_swiglu, "x_format": cfg.precision.x.format}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh environment with the built wheel installed (no dependencies from the wheel's metadata)."""
    root = tmp_path_factory.mktemp("wheel")
    # Build from the files a clone has (tracked, or new and not ignored), never from a checkout's
    # leftovers: a stale build/ folder would hand the wheel files that setup.py no longer ships.
    source = root / "src"
    files = subprocess.check_output(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, text=True).split("\n")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name, follow_symlinks=False)
    dist = root / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(dist), "-q"],
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    [wheel] = list(dist.glob("megatron_lowp-*.whl"))
    env = root / "env"
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # The dependencies come from this environment's site-packages, as a plain path entry: its .pth
    # files (the checkout's editable install among them) are not processed from there.
    (site / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    return python


def test_the_wheel_ships_the_recipe_packages_and_presets(installed, tmp_path):
    listing = subprocess.check_output(
        [str(installed), "-c", "import megatron_lowp, pathlib; p = pathlib.Path(megatron_lowp.__file__).parent; "
                               "print('\\n'.join(sorted(str(f.relative_to(p)) for f in p.rglob('*.*') "
                               "if f.suffix in ('.yaml', '.json', '.model'))))"], text=True, cwd=tmp_path)
    shipped = set(listing.split())
    expected = {str(f.relative_to(REPO / "megatron_lowp")) for f in (REPO / "megatron_lowp/configs").rglob("*.*")}
    assert expected and expected <= shipped, expected - shipped
    assert "data/corpus/tokenizer.model" in shipped


def test_the_installed_package_trains_fp8_and_fp4_for_real(installed, tmp_path):
    small = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
             "model.ffn_hidden_size=128", "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=8",
             "train.steps=2", "optim.warmup_steps=1", "train.eval_every=0", "logging.progress=false"]
    proc = subprocess.run([str(installed), "-c", PROBE, str(REPO), str(tmp_path / "runs"), *small],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path),
                               "MEGATRON_LOWP_CACHE": os.environ.get("MEGATRON_LOWP_CACHE", str(tmp_path / "cache"))})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["package"].startswith(str(installed.parent.parent)), out["package"]  # not the checkout
    fp8, fp4 = out["runs"]["fp8"], out["runs"]["fp4"]
    # 2 blocks x (qkv, out, gate, up, down) are quantized; lm_head stays high precision
    assert fp8["quantized_linears"] == fp4["quantized_linears"] == 10
    assert fp8["moment_dtypes"] == ["torch.float32", "torch.float8_e4m3fn", "torch.float8_e5m2"]  # 1-D params: FP32
    assert fp8["x_format"] == "fp8_e4m3" and fp4["x_format"] == "nvfp4" and fp8["smooth_swiglu"] and fp4["smooth_swiglu"]
    assert fp8["steps"] == fp4["steps"] == 2
