"""The numerics benchmark runs end to end and writes a complete table (numbers are not asserted:
benchmarks measure, tests check behaviour)."""

import importlib.util
import json

import pytest


@pytest.mark.slow  # ~45 s: runs every quantizer row of the benchmark once
def test_bench_numerics_writes_every_row(repo, tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_numerics", repo / "scripts/bench_numerics.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "RECIPES", dict(list(bench.RECIPES.items())[:1]))  # one recipe keeps it quick
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--elements", "16384", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    ops = {(r["op"], r["rounding"]) for r in result["quantizers"]}
    assert len(ops) == 1 + 5 * 2 and ("fake_quantize nvfp4", "stochastic") in ops
    assert all(r["seconds"] > 0 and r["GB_per_s"] > 0 for r in result["quantizers"])
    assert {r["layer"] for r in result["linears"]} == {"nn.Linear", "fp8 (paper roles)"}
    assert result["device"] == "cpu"
    assert "fake_quantize mxfp8" in capsys.readouterr().out
