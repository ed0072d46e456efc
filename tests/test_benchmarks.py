"""Smoke test of benchmarks/bench_auto.py on one tiny shape: it runs, prints its table and writes JSON."""
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_auto.py"


def test_bench_auto_runs_on_a_tiny_ladder(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_auto", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "LADDER", [(2, 32, 4, 4)])
    monkeypatch.setattr(bench, "ITERS", (2, 2))
    out = tmp_path / "auto.json"
    assert bench.main(["--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["layout"], r["case"]) for r in rows} == {
        (layout, case) for layout in ("nchw", "cl") for case in bench.CASES}
    assert all(r["ratio"] > 0 and len(r["cpu_ms"]) == 2 for r in rows)
    assert "smallest size" in capsys.readouterr().out
