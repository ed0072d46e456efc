"""Smoke test of benchmarks/bench_cpu.py on tiny shapes: it runs, prints its tables and writes JSON."""
import importlib.util
import json
from pathlib import Path

from helpers import backend_or_skip

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_cpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_interleaved_alternates_sides_and_rotates_inputs(monkeypatch):
    """Rounds of one call per side, in order then in reverse order, consecutive input sets across
    all sides, a median per half per side, and the round count within [least, most] by the time
    budget."""
    bench = _load_bench()
    calls = []
    side = lambda name: lambda inp: calls.append((name, inp))    # noqa: E731
    ours, theirs, floor = side("ours"), side("theirs"), side("floor")
    a, b = bench.interleaved((ours, theirs), [0, 1, 2], 0, 4, 50)   # no warm-up: `least` rounds
    assert len(a) == len(b) == 2 and all(t >= 0 for t in a + b)
    assert len(calls) == 2 * 2 * 4
    assert [name for name, _ in calls[:4]] == ["ours", "theirs", "theirs", "ours"]
    assert [inp for _, inp in calls] == [i % 3 for i in range(len(calls))]
    calls.clear()
    assert len(bench.interleaved((ours, theirs, floor), [0, 1], 0, 2, 50)) == 3
    assert [name for name, _ in calls[:6]] == ["ours", "theirs", "floor", "floor", "theirs", "ours"]
    assert [inp for _, inp in calls] == [i % 2 for i in range(3 * 2 * 2)]
    calls.clear()
    monkeypatch.setattr(bench, "ROUND_BUDGET_S", 10.0)      # fast sides: capped at `most`
    bench.interleaved((ours, theirs), [0], 1, 4, 6)
    assert len(calls) == 2 + 2 * 2 * 6
    calls.clear()
    monkeypatch.setattr(bench, "ROUND_BUDGET_S", 0.0)       # no budget: `least`
    bench.interleaved((ours, theirs), [0], 1, 3, 6)
    assert len(calls) == 2 + 2 * 2 * 3


def test_pass_floor_makes_the_rows_passes():
    """The floor makes the row's passes: y from x (and r); dx from x and dy (or x and r); dr from
    dy."""
    bench = _load_bench()
    import torch
    x, r, dy = torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    w = b = torch.ones(4)
    plain = [(x, w, b, None, dy)]
    run = bench.pass_floor(plain, True, False)
    run(plain[0])
    y, dx = run.outputs[id(x)]
    assert torch.equal(y, x) and torch.equal(dx, x + dy)
    fused = [(x, w, b, r, dy)]
    run = bench.pass_floor(fused, True, True)
    run(fused[0])
    y, dx, dr = run.outputs[id(x)]
    assert torch.equal(y, x + r) and torch.equal(dx, x + r) and torch.equal(dr, dy)
    run = bench.pass_floor(fused, False, True)
    run(fused[0])
    assert len(run.outputs[id(x)]) == 1


def test_bench_cpu_runs_on_tiny_shapes(tmp_path, monkeypatch, capsys):
    bench = _load_bench()
    backend_or_skip("cpu")     # (fails instead when GROUPNORM_REQUIRE_BACKENDS names it)
    tiny = [("tiny", 1, 32, (4, 4)), ("tiny3d", 2, 64, (2, 3, 4))]
    monkeypatch.setattr(bench, "QUICK_PLAIN", tiny)
    monkeypatch.setattr(bench, "QUICK_FUSED", tiny[:1])
    monkeypatch.setattr(bench, "ITERS", {"quick": (1, 2, 2)})
    monkeypatch.setattr(bench, "TINY_ITERS", {"quick": (1, 3)})
    monkeypatch.setattr(bench, "COPY_ELEMS", 1 << 16)
    monkeypatch.setattr(bench, "cache_sizes", lambda: (256, 1 << 16))   # "> L2" for the tiny ones
    out = tmp_path / "cpu.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    tables = {r["table"] for r in rows}
    assert tables == {"plain fwd+bwd", "fused fwd", "fused fwd+bwd", "copy floor", "per call",
                      "first call"}
    plain = [r for r in rows if r["table"] == "plain fwd+bwd"]
    assert {(r["shape"], r["layout"]) for r in plain} == {
        (s, layout) for s in ("tiny", "tiny3d") for layout in ("nchw", "channels_last")}
    assert all(r["speedup"] > 0 and len(r["ours_ms"]) == 2 == len(r["torch_ms"]) for r in plain)
    assert all(r["at_floor"] > 0 and len(r["floor_ms"]) == 2 for r in rows if "at_floor" in r)
    assert sum("at_floor" in r for r in rows) == len(plain) + 2 * 2
    floor = [r for r in rows if r["table"] == "copy floor"]
    assert floor and all(r["of_copy"] > 0 and len(r["copy_ms"]) == 2 == len(r["clone_ms"]) for r in floor)
    assert "geomean" in capsys.readouterr().out


def test_at_floor_bounds_the_speedup():
    """torch / floor per row, geomean; with torch's tiny-input cost added to each floor."""
    bench = _load_bench()
    rows = [{"table": "plain fwd+bwd", "layout": "nchw", "torch_ms": [0.4, 0.4],
             "floor_ms": [0.1, 0.1], "at_floor": 4.0},
            {"table": "plain fwd+bwd", "layout": "nchw", "torch_ms": [1.0, 1.0],
             "floor_ms": [0.9, 0.9], "at_floor": 1.0 / 0.9},
            {"table": "per call", "path": "torch F.group_norm", "forward_us": [10.0, 20.0],
             "fwd_bwd_us": [100.0, 200.0]}]
    text = bench.at_floor(rows, "plain fwd+bwd", "nchw", 1.5)
    assert "an op at the floor: 2.11x" in text              # sqrt(4 / 0.9)
    assert "per-call cost: 1.41x, 1 of 2 rows below 1.5x" in text   # sqrt(0.4 / 0.2 * 1.0 / 1.0)
    assert bench.at_floor(rows, "plain fwd+bwd", "channels_last", 1.5) == ""
