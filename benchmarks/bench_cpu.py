"""CPU Group Norm: the C++ op (groupnorm.kernels.cpu) against torch, in one process.

    python benchmarks/bench_cpu.py [--quick] [--threads 2] [--json OUT]

Tables (float32, G = 32, medians):
  1. plain forward + backward (dx, dweight, dbias) against torch's F.group_norm, NCHW and
     channels_last, batch 1, 2 and 32: ResNet-50 stages, U-Net stages, 3D;
  2. fused GN + SiLU + residual, forward and forward + backward, against the native composite
     F.silu(F.group_norm(x) + r);
     in both, beside each pair, the row's floor: its tensor passes alone (x -> y; x, dy -> dx; with
     r and dr when fused) as ATen's copy_ / add into tensors allocated once, so that torch / floor
     is the speedup an op running at the memory's speed would show;
  3. forward against the copy floor on inputs larger than L2: a copy of x (read x, write y, the
     least a forward moves) timed beside it on the same rotated inputs, into a preallocated tensor
     (copy_: the floor) and into a fresh one each call (clone: an output allocated per call, as the
     op's is);
  4. per-call cost on a tiny input (2, 64, 8, 8): the op, the public groupnorm.functional path, torch;
  5. the first call in a fresh process, beyond the call itself;
then each target of issue 13, met or not, from the rows of this run (also in the JSON).

Method: each pair (and its floor) is warmed up, then timed call by call (time.perf_counter) in
rounds of one call of each side, in alternating order, on inputs rotated so that together they
exceed the last-level cache. Each side's median over the first and over the second half of the
rounds are both printed (their spread is the noise); the ratio uses their sums. Rounds: about
ROUND_BUDGET_S per half, 15 to 100. Outputs are allocated per call; malloc keeps freed memory up to
32 MiB an allocation (see steady_heap; --glibc-malloc: glibc's defaults, under which single rows
swing 2-5x with the order of frees). Other processes on the machine show up as the spread.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from groupnorm.kernels import build as cpu_build  # noqa: E402
from groupnorm.kernels import cpu  # noqa: E402

G = 32
LLC_BYTES = 32 << 20       # replaced by the machine's own (sysfs) when it says
L2_BYTES = 1 << 20
# (name, C, spatial); batches per family below.
RESNET = [("resnet s1", 256, (56, 56)), ("resnet s2", 512, (28, 28)),
          ("resnet s3", 1024, (14, 14)), ("resnet s4", 2048, (7, 7))]
UNET = [("unet 64", 320, (64, 64)), ("unet 32", 640, (32, 32)), ("unet 16", 1280, (16, 16)),
        ("unet 128", 128, (128, 128))]
VOLUME = [("3d 16x56x56", 64, (16, 56, 56)), ("3d 8x28x28", 256, (8, 28, 28))]
PLAIN = ([(n, N, C, sp) for N in (1, 2, 32) for n, C, sp in RESNET]
         + [(n, N, C, sp) for N in (1, 2) for n, C, sp in UNET + VOLUME])
FUSED = [(n, N, C, sp) for N in (1, 2) for n, C, sp in UNET] + [(n, 2, C, sp) for n, C, sp in RESNET]
QUICK_PLAIN = [(n, N, C, sp) for N in (1, 2) for n, C, sp in RESNET[:2] + UNET[:2] + VOLUME[:1]] \
    + [("resnet s4", 32, 2048, (7, 7))]
QUICK_FUSED = [(n, N, C, sp) for N in (1, 2) for n, C, sp in UNET[:2]]
TINY = (2, 64, 8, 8)
COPY_ELEMS = 64 << 20      # the large copy that measures bandwidth: 256 MiB of float32
# (warm-up calls, least and most rounds per half) of a pair; a half takes about ROUND_BUDGET_S
ITERS = {"full": (3, 15, 100), "quick": (2, 7, 30)}
ROUND_BUDGET_S = 0.25
TINY_ITERS = {"full": (200, 2000), "quick": (100, 500)}


def steady_heap() -> str:
    """glibc's malloc by default maps each allocation of more than a moving threshold (128 KiB to
    32 MiB) afresh and trims the heap top beyond twice that: whether a call's outputs page-fault
    then depends on the order of the frees before it, which differs between the two sides and from
    run to run (single rows swung 2-5x here). Fixing the thresholds (the heap keeps what is freed,
    up to 32 MiB per allocation) gives both sides the steady state of a training loop; allocations
    above 32 MiB (batch-32 outputs) are still mapped afresh on every call. Returns the policy."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3      # <malloc.h>
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
        return "steady heap (mallopt: mmap threshold 32 MiB, trim threshold 1 GiB)" if ok else \
            "glibc default (mallopt failed)"
    except (OSError, AttributeError):
        return "default (not glibc)"


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "op": cpu.available() or "loaded"}
    stamp = cpu_build.read_stamp(cpu_build.build_dir(torch.__version__)) or {}
    info["op_capability"] = stamp.get("capability")
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        keep = ("Model name", "CPU(s)", "Thread(s) per core", "L1d cache", "L2 cache", "L3 cache")
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in keep:
                info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["load average"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        pass
    return info


def cache_sizes():
    """(L2 per core, last-level) bytes from sysfs, else the defaults."""
    sizes = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            level = int((idx / "level").read_text())
            text = (idx / "size").read_text().strip()
            sizes[level] = int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
        except (OSError, ValueError, KeyError):
            continue
    return sizes.get(2, L2_BYTES), sizes.get(max(sizes) if sizes else 3, LLC_BYTES)


def median_time(fn, inputs, warmup, iters) -> float:
    """Median seconds of fn(inp) over `iters` calls, after `warmup`, inputs in rotation."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times = []
    for i in range(iters):
        inp = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        fn(inp)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(sides, inputs, warmup, least, most):
    """[[m1, m2] per side]: each side's medians over the first and the second half of the rounds.
    A round times one call of each side, in order in even rounds and in reverse order in odd ones,
    so that all see the machine in the same state (its memory bandwidth drifts over seconds here,
    and a block of one side's calls would take the drift for a difference); consecutive calls take
    consecutive input sets, so an input is back in use only after len(inputs) calls of any side.
    Rounds per half: as many as ROUND_BUDGET_S allows at the warm-up's pace, `least` to `most`."""
    calls = 0

    def call(fn):
        nonlocal calls
        inp = inputs[calls % len(inputs)]
        calls += 1
        t0 = time.perf_counter()
        fn(inp)
        return time.perf_counter() - t0

    pace = []
    for _ in range(warmup):
        pace.append(sum(call(fn) for fn in sides))
    rounds = least
    if pace:
        rounds = max(least, min(most, int(ROUND_BUDGET_S / max(min(pace), 1e-9))))
    times = [[] for _ in sides]
    order = list(range(len(sides)))
    for r in range(2 * rounds):
        for j in (order if r % 2 == 0 else order[::-1]):
            times[j].append(call(sides[j]))
    return [[statistics.median(t[:rounds]), statistics.median(t[rounds:])] for t in times]


def make_inputs(N, C, spatial, cl, residual, grad, llc):
    """Enough independent input sets to exceed 2x the last-level cache (at most 8)."""
    shape = (N, C, *spatial)
    nbytes = 4 * math.prod(shape) * (2 + residual)
    copies = max(1, min(8, math.ceil(2 * llc / nbytes)))
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)] if cl else \
        torch.contiguous_format
    sets = []
    for _ in range(copies):
        x = torch.randn(shape).contiguous(memory_format=fmt)
        w, b = torch.randn(C) * 0.5 + 1, torch.randn(C) * 0.5
        r = torch.randn(shape).contiguous(memory_format=fmt) if residual else None
        dy = torch.randn(shape).contiguous(memory_format=fmt)
        if grad:
            x.requires_grad_()
            w.requires_grad_()
            b.requires_grad_()
            if r is not None:
                r.requires_grad_()
        sets.append((x, w, b, r, dy))
    return sets


def fwd_bwd(f):
    def run(inp):
        x, w, b, r, dy = inp
        wrt = (x, w, b) if r is None else (x, w, b, r)
        torch.autograd.grad(f(x, w, b, r), wrt, dy)
    return run


def fwd(f):
    def run(inp):
        x, w, b, r, _ = inp
        f(x, w, b, r)
    return run


def ours_plain(x, w, b, r):
    return cpu.group_norm(x, G, w, b, 1e-5, None, None)


def torch_plain(x, w, b, r):
    return F.group_norm(x, G, w, b, 1e-5)


def ours_fused(x, w, b, r):
    return cpu.group_norm(x, G, w, b, 1e-5, "silu", r)


def native_fused(x, w, b, r):
    return F.silu(F.group_norm(x, G, w, b, 1e-5) + r)


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def fmt_ms(pair):
    return "/".join(f"{1e3 * t:.3f}" for t in pair)


def row(kind, name, N, C, spatial, cl, ours, theirs, **extra):
    return {"table": kind, "shape": name, "N": N, "C": C, "spatial": list(spatial),
            "layout": "channels_last" if cl else "nchw", "ours_ms": [1e3 * t for t in ours],
            "torch_ms": [1e3 * t for t in theirs], "speedup": sum(theirs) / sum(ours), **extra}


def pass_floor(sets, grad, residual):
    """The row's tensor passes and nothing else, as ATen's streaming copy_ / add into tensors
    allocated once: forward reads x (and r) and writes y; backward reads x and dy (and r) and
    writes dx (and dr). No reductions, no allocation, no autograd: torch / floor is the speedup an
    op would show if it ran at the memory's speed (only non-temporal stores, which skip the read of
    an output line before its write, could go below this floor on outputs not in cache)."""
    outs = 1 + grad + (grad and residual)
    bufs = {id(s[0]): [torch.empty_like(s[0]) for _ in range(outs)] for s in sets}

    def run(inp):
        x, _, _, r, dy = inp
        out = bufs[id(x)]
        x = x.detach()
        if r is None:
            out[0].copy_(x)
            if grad:
                torch.add(x, dy, out=out[1])
        else:
            r = r.detach()
            torch.add(x, r, out=out[0])
            if grad:
                torch.add(x, r, out=out[1])
                out[2].copy_(dy)
    run.outputs = bufs      # (for the test)
    return run


def bench_pairs(kind, cases, ours, theirs, wrap, grad, residual, iters, llc, rows):
    print(f"\n## {kind}   (ms: two interleaved medians each; speedup = torch / ours; floor: the "
          f"row's tensor passes alone (pass_floor); at floor: torch / floor)")
    print(f"{'shape':<14}{'N':>3} {'layout':<14}{'ours':>19}{'torch':>19}{'floor':>19}"
          f"{'speedup':>9}{'at floor':>10}")
    for name, N, C, spatial in cases:
        for cl in (False, True):
            sets = make_inputs(N, C, spatial, cl, residual, grad, llc)
            a, b, f = interleaved((wrap(ours), wrap(theirs), pass_floor(sets, grad, residual)),
                                  sets, *iters)
            rows.append(row(kind, name, N, C, spatial, cl, a, b, floor_ms=[1e3 * t for t in f],
                            at_floor=sum(b) / sum(f)))
            r = rows[-1]
            print(f"{name:<14}{N:>3} {r['layout']:<14}{fmt_ms(a):>19}{fmt_ms(b):>19}{fmt_ms(f):>19}"
                  f"{r['speedup']:>8.2f}x{r['at_floor']:>9.2f}x", flush=True)
            del sets
    for layout in ("nchw", "channels_last"):
        mine = [r for r in rows if r["table"] == kind and r["layout"] == layout]
        if mine:
            s = [r["speedup"] for r in mine]
            print(f"{kind} {layout}: geomean {geomean(s):.2f}x, min {min(s):.2f}x over {len(s)}; "
                  f"at the floor {geomean([r['at_floor'] for r in mine]):.2f}x")


def copy_floor(cases, iters, l2, llc, rows):
    """Forward time against the least a forward can cost: a copy of x into a tensor of its shape and
    layout (read x, write y), timed beside it on the same rotated inputs. copy_ writes into memory
    allocated once (the floor); clone into a fresh output each call, as the op does. A large copy's
    bandwidth is printed for reference only: rows differ from it by how much of them L3 holds."""
    big = torch.randn(COPY_ELEMS)
    dst = torch.empty_like(big)
    t_big = statistics.median([_timed(lambda: dst.copy_(big)) for _ in range(2 + iters[1])][2:])
    del big, dst
    print(f"\n## forward vs the copy floor (inputs > L2 = {l2 >> 10} KiB; a 256 MiB copy_ runs at "
          f"{2 * COPY_ELEMS * 4 / t_big / 1e9:.1f} GB/s)")
    print(f"{'shape':<14}{'N':>3} {'layout':<14}{'ours ms':>16}{'copy_ ms':>16}{'clone ms':>16}"
          f"{'of copy_':>10}{'of clone':>10}")
    for name, N, C, spatial in cases:
        nbytes = 4 * N * C * math.prod(spatial)
        if nbytes <= l2:
            continue
        for cl in (False, True):
            sets = make_inputs(N, C, spatial, cl, False, False, llc)
            outs = [torch.empty_like(inp[0]) for inp in sets]
            slot = {id(inp[0]): out for inp, out in zip(sets, outs)}
            copy = lambda inp: slot[id(inp[0])].copy_(inp[0])       # noqa: E731
            clone = lambda inp: inp[0].clone()                      # noqa: E731
            times, t_copy = interleaved((fwd(ours_plain), copy), sets, *iters)
            t_clone = [median_time(clone, sets, iters[0], iters[1]) for _ in range(2)]
            t, floor, fresh = sum(times) / 2, sum(t_copy) / 2, sum(t_clone) / 2
            rows.append({"table": "copy floor", "shape": name, "N": N, "C": C,
                         "spatial": list(spatial), "layout": "channels_last" if cl else "nchw",
                         "ours_ms": [1e3 * v for v in times], "copy_ms": [1e3 * v for v in t_copy],
                         "clone_ms": [1e3 * v for v in t_clone], "floor_ms": 1e3 * floor,
                         "of_copy": floor / t, "of_clone": fresh / t})
            r = rows[-1]
            print(f"{name:<14}{N:>3} {r['layout']:<14}{fmt_ms(times):>16}{fmt_ms(t_copy):>16}"
                  f"{fmt_ms(t_clone):>16}{100 * r['of_copy']:>9.0f}%{100 * r['of_clone']:>9.0f}%",
                  flush=True)
            del sets, outs, slot


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def per_call(iters, rows):
    """Per-call cost on a tiny input, single calls, microseconds."""
    import groupnorm.functional as GF
    x = torch.randn(TINY)
    w, b = torch.randn(TINY[1]), torch.randn(TINY[1])
    xg, wg, bg = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    dy = torch.randn(TINY)
    sides = {
        "op (cpu.group_norm)": lambda x, w, b: cpu.group_norm(x, G, w, b, 1e-5, None, None),
        "public (groupnorm.functional)": lambda x, w, b: GF.group_norm(x, G, w, b, 1e-5),
        "torch F.group_norm": lambda x, w, b: F.group_norm(x, G, w, b, 1e-5),
    }
    print(f"\n## per call on {TINY} (us, two medians of {iters[1]} calls)")
    print(f"{'path':<32}{'forward':>16}{'fwd+bwd':>16}")
    for name, f in sides.items():
        tf = [median_time(lambda _: f(x, w, b), [None], *iters) for _ in range(2)]
        tb = [median_time(lambda _: torch.autograd.grad(f(xg, wg, bg), (xg, wg, bg), dy), [None],
                          *iters) for _ in range(2)]
        rows.append({"table": "per call", "path": name, "forward_us": [1e6 * t for t in tf],
                     "fwd_bwd_us": [1e6 * t for t in tb]})
        print(f"{name:<32}{'/'.join(f'{1e6 * t:.1f}' for t in tf):>16}"
              f"{'/'.join(f'{1e6 * t:.1f}' for t in tb):>16}", flush=True)


FIRST_CALL = """
    import time
    t0 = time.perf_counter()
    import torch
    import groupnorm.functional as GF
    x = torch.randn(2, 64, 8, 8)
    t1 = time.perf_counter()
    GF.group_norm(x, 32)
    t2 = time.perf_counter()
    GF.group_norm(x, 32)
    t3 = time.perf_counter()
    print(t1 - t0, t2 - t1, t3 - t2)
"""


def first_call(rows):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(FIRST_CALL)], capture_output=True,
                         text=True, timeout=300)
    if out.returncode:
        print(f"\n## first call: the subprocess failed: {out.stderr.strip()[-300:]}")
        return
    imp, first, second = (float(v) for v in out.stdout.split()[-3:])
    rows.append({"table": "first call", "import_s": imp, "first_s": first, "second_s": second,
                 "beyond_s": first - second})
    print(f"\n## first call in a fresh process: import {imp:.2f} s, first call {1e3 * first:.1f} "
          f"ms, second {1e3 * second:.3f} ms: {1e3 * (first - second):.1f} ms beyond the call")


def at_floor(rows, kind, layout, target) -> str:
    """The geomean speedup an op at the floor would show over the same rows (pass_floor), and the
    same with the per-call cost added that torch pays on the tiny input (forward for the forward
    table, forward + backward for the others: autograd, dispatch, allocation, which any op called
    as torch's is pays too), with how many rows that leaves below the target."""
    mine = [r for r in rows if r["table"] == kind and r["layout"] == layout]
    if not mine:
        return ""
    ms = lambda r, key: sum(r[key]) / len(r[key])       # noqa: E731
    text = f" (an op at the floor: {geomean([r['at_floor'] for r in mine]):.2f}x"
    tiny = [r for r in rows if r["table"] == "per call" and r["path"].startswith("torch")]
    if tiny:
        fixed = 1e-3 * min(tiny[0]["forward_us" if kind == "fused fwd" else "fwd_bwd_us"])
        bound = [ms(r, "torch_ms") / (ms(r, "floor_ms") + fixed) for r in mine]
        text += (f"; with torch's per-call cost: {geomean(bound):.2f}x, "
                 f"{sum(b < target for b in bound)} of {len(bound)} rows below {target:g}x")
    return text + ")"


def targets(rows) -> list[dict]:
    """Issue 13's targets against this run's rows: [{target, value, met}], met None when the run
    has no row for it. Ratios are torch / ours (sums of the two medians); the copy floor counts
    shapes larger than L2 (the only ones in its table)."""
    out = []

    def add(name, value, met):
        out.append({"target": name, "value": value, "met": met})

    for layout in ("nchw", "channels_last"):
        s = [r["speedup"] for r in rows if r["table"] == "plain fwd+bwd" and r["layout"] == layout]
        if s:
            add(f"plain fwd+bwd {layout}: >= 1.0x every row",
                f"min {min(s):.2f}x, {sum(v < 1 for v in s)} of {len(s)} rows below",
                min(s) >= 1.0)
            add(f"plain fwd+bwd {layout}: >= 1.5x geomean", f"{geomean(s):.2f}x"
                f"{at_floor(rows, 'plain fwd+bwd', layout, 1.5)}", geomean(s) >= 1.5)
    for kind in ("fused fwd", "fused fwd+bwd"):
        for layout in ("nchw", "channels_last"):
            s = [r["speedup"] for r in rows if r["table"] == kind and r["layout"] == layout]
            if s:
                add(f"{kind} {layout}: >= 2x geomean", f"{geomean(s):.2f}x"
                    f"{at_floor(rows, kind, layout, 2.0)}", geomean(s) >= 2.0)
    for layout in ("nchw", "channels_last"):
        s = [r["of_copy"] for r in rows if r["table"] == "copy floor" and r["layout"] == layout]
        if s:
            add(f"forward {layout}: >= 70 % of the copy floor above L2",
                f"median {100 * statistics.median(s):.0f} %, min {100 * min(s):.0f} %, "
                f"{sum(v < 0.7 for v in s)} of {len(s)} below", min(s) >= 0.7)
    public = [r for r in rows if r["table"] == "per call" and r["path"].startswith("public")]
    if public:
        fwd, both = min(public[0]["forward_us"]), min(public[0]["fwd_bwd_us"])
        add("per call, public path, tiny forward <= 15 us", f"{fwd:.1f} us", fwd <= 15)
        add("per call, public path, tiny forward + backward <= 60 us", f"{both:.1f} us",
            both <= 60)
    first = [r for r in rows if r["table"] == "first call"]
    if first:
        add("first call: < 0.1 s beyond the call", f"{1e3 * first[0]['beyond_s']:.1f} ms",
            first[0]["beyond_s"] < 0.1)
    return out


def print_targets(summary):
    print("\n## targets of issue 13 (this run)")
    for t in summary:
        mark = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        print(f"- {t['target']}: {t['value']} ({mark})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and calls (~2 min)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="OUT", help="write every row as JSON")
    parser.add_argument("--glibc-malloc", action="store_true",
                        help="keep glibc's moving malloc thresholds (see steady_heap)")
    args = parser.parse_args(argv)
    if cpu.available() is not None:
        print(f"bench_cpu: {cpu.available()}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    iters = ITERS[mode]
    l2, llc = cache_sizes()
    info = machine()
    info["malloc"] = "glibc default" if args.glibc_malloc else steady_heap()
    print("# CPU Group Norm benchmark (float32, G = 32)")
    for k, v in info.items():
        print(f"- {k}: {v}")
    rows = []
    plain = QUICK_PLAIN if args.quick else PLAIN
    fused = QUICK_FUSED if args.quick else FUSED
    bench_pairs("plain fwd+bwd", plain, ours_plain, torch_plain, fwd_bwd, True, False, iters, llc,
                rows)
    bench_pairs("fused fwd", fused, ours_fused, native_fused, fwd, False, True, iters, llc, rows)
    bench_pairs("fused fwd+bwd", fused, ours_fused, native_fused, fwd_bwd, True, True, iters, llc,
                rows)
    copy_floor(plain, iters, l2, llc, rows)
    per_call(TINY_ITERS[mode], rows)
    first_call(rows)
    summary = targets(rows)
    print_targets(summary)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": info, "targets": summary, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
