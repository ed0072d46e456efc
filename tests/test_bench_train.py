"""Smoke test of benchmarks/bench_train.py: every variant trains a step, the fused and unfused GN
variants really differ in how the blocks end, and the table has the fusion column."""
import importlib.util
import json
from pathlib import Path

from helpers import backend_or_skip

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


def test_bench_train_runs_every_variant(tmp_path, capsys, monkeypatch):
    backend_or_skip("cpu")
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    calls = []
    real = bench.layers.norm_add_relu.__globals__["fuses_residual_relu"]
    monkeypatch.setattr(bench.layers, "fuses_residual_relu",
                        lambda norm_layer: calls.append(real(norm_layer)) or real(norm_layer))
    out = tmp_path / "train.json"
    bench.main(["--batches", "8", "--rounds", "1", "--steps", "1", "--warmup", "1", "--model", "small_resnet",
                "--model-args", '{"depth": 8, "width": 8}', "--groups", "4", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert {r["variant"] for r in rows} == set(bench.VARIANTS)
    assert all(r["images_per_s"] > 0 for r in rows)
    assert True in calls                      # gn-ours fused its blocks through the hook
    assert "fused / unfused" in capsys.readouterr().out
