"""Benchmark: our Group Norm kernels against torch's native ops, and against the memory-bandwidth floor.

    python benchmarks/bench_kernels.py [--quick] [--device cpu|cuda] [--dtype float32] [--json OUT]

For every shape (ResNet-50 stages at batch 2 and 32, diffusion U-Net stages at batch 2, a video 3D
block), both memory formats (NCHW-contiguous and channels_last / channels_last_3d) and G = 32:

* ``fwd``         y = GN(x) * w + b                         ours vs F.group_norm
* ``fwd+bwd``     the same, then y.backward(dy) (dx, dw, db)
* ``fused``       y = silu(GN(x) * w + b + r)               ours (one kernel) vs F.group_norm, +, F.silu
* ``fused+bwd``   the same, then y.backward(dy) (dx, dw, db, dr)

Method: one process; inputs rotate among several independent sets (together larger than the
last-level cache, so no call finds its data cached by the previous one); a warm-up, then the median
of many timed calls; each (ours, native) pair is measured twice, interleaved, and both medians are
printed to show the spread. The floor is the minimum number of bytes a kernel must move (read x,
write y; backward: read x and dy, write dx; plus the residual and its gradient when fused) divided
by the bandwidth of a large ``torch`` copy (bytes read + bytes written) into existing memory,
measured at the start and at the end of the run (the better of the two); "%floor" is floor time /
measured time. Ours goes through the public ``groupnorm.kernels.op.group_norm``, dispatch included.

On the CPU the kernels use torch.get_num_threads() threads (set with --threads). Outputs are
allocated per call, as in training, so page faults on fresh memory count (for both); ``--thp``
gives large outputs huge pages (see the code for why that is not the default). ``--device cuda``
compares the Triton kernels with torch's CUDA ops (timed with CUDA events).
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
import time
from pathlib import Path

if "--thp" in sys.argv:
    # Before torch is imported: CPU tensors >= 2 MiB get 2 MiB-aligned, huge-page-advised memory
    # (torch's THP_MEM_ALLOC_ENABLE). Why offer it: outputs above glibc's mmap threshold (32 MiB at
    # most, so every batch-32 ResNet tensor) are fresh mappings that page-fault once per 4 KiB on
    # every call, ~80 ms per 100 MB on our VM against ~16 ms for the copy itself, for torch's ops
    # and ours alike. Not the default: on our VM it makes mid-size (2-32 MiB) outputs fault on
    # every call instead.
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from groupnorm.kernels import op  # noqa: E402

G = 32
SHAPES = [  # (name, shape)
    ("rn50-s1 b2", (2, 256, 56, 56)), ("rn50-s2 b2", (2, 512, 28, 28)),
    ("rn50-s3 b2", (2, 1024, 14, 14)), ("rn50-s4 b2", (2, 2048, 7, 7)),
    ("rn50-s1 b32", (32, 256, 56, 56)), ("rn50-s2 b32", (32, 512, 28, 28)),
    ("rn50-s3 b32", (32, 1024, 14, 14)), ("rn50-s4 b32", (32, 2048, 7, 7)),
    ("unet-320 b2", (2, 320, 64, 64)), ("unet-640 b2", (2, 640, 32, 32)),
    ("unet-1280 b2", (2, 1280, 16, 16)), ("video3d b2", (2, 256, 8, 28, 28)),
]
QUICK = {"rn50-s1 b2", "rn50-s3 b2", "unet-320 b2", "video3d b2"}
CASES = ("fwd", "fwd+bwd", "fused", "fused+bwd")


# -------------------------------------------------------------------------------------------------
# Timing
# -------------------------------------------------------------------------------------------------

class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def median_time(timer, make_call, sets, min_iters, target_s, max_iters) -> float:
    """Median seconds of make_call(set)() over rotating sets, after one warm-up round."""
    for s in sets:
        timer(make_call(s))
    times = []
    t_start = time.perf_counter()
    i = 0
    while i < max_iters and (i < min_iters or time.perf_counter() - t_start < target_s):
        times.append(timer(make_call(sets[i % len(sets)])))
        i += 1
    return statistics.median(times)


def copy_bandwidth(device, timer, nbytes=256 << 20) -> float:
    """Bytes/s of a large copy (read + write counted), median of 10."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    t = statistics.median(timer(lambda: dst.copy_(src)) for _ in range(10))
    return 2 * nbytes / t


# -------------------------------------------------------------------------------------------------
# Cases
# -------------------------------------------------------------------------------------------------

def make_sets(shape, memory_format, dtype, device, nsets):
    sets = []
    C = shape[1]
    for k in range(nsets):
        gen = torch.Generator(device="cpu").manual_seed(k)

        def rnd(*s):
            return torch.randn(*s, generator=gen, dtype=dtype).to(device)

        x = (rnd(*shape) + 0.5).contiguous(memory_format=memory_format)
        sets.append(dict(x=x, r=rnd(*shape).contiguous(memory_format=memory_format),
                         dy=rnd(*shape).contiguous(memory_format=memory_format),
                         w=rnd(C), b=rnd(C)))
    return sets


def ours(s, case, impl):
    fused = case.startswith("fused")
    act, r = ("silu", s["r"]) if fused else (None, None)
    if not case.endswith("bwd"):
        return lambda: op.group_norm(s["x"], G, s["w"], s["b"], 1e-5, act, r, impl=impl)
    return _fwd_bwd(s, fused, lambda x, w, b, r: op.group_norm(x, G, w, b, 1e-5, act, r, impl=impl))


def native(s, case, impl=None):
    fused = case.startswith("fused")
    if not case.endswith("bwd"):
        if fused:
            return lambda: F.silu(F.group_norm(s["x"], G, s["w"], s["b"], 1e-5) + s["r"])
        return lambda: F.group_norm(s["x"], G, s["w"], s["b"], 1e-5)
    if fused:
        return _fwd_bwd(s, True, lambda x, w, b, r: F.silu(F.group_norm(x, G, w, b, 1e-5) + r))
    return _fwd_bwd(s, False, lambda x, w, b, r: F.group_norm(x, G, w, b, 1e-5))


def _fwd_bwd(s, fused, fn):
    """A call that runs fn forward and backward on leaves prepared outside the timed region."""
    leaves = [s["x"].detach().requires_grad_(), s["w"].detach().requires_grad_(),
              s["b"].detach().requires_grad_()]
    r = s["r"].detach().requires_grad_() if fused else None

    def call():
        fn(*leaves, r).backward(s["dy"])
    return call


def floor_bytes(shape, itemsize, case) -> int:
    n = math.prod(shape) * itemsize
    fused = case.startswith("fused")
    fwd = (2 + fused) * n                        # read x (+ r), write y
    bwd = (3 + 2 * fused) * n                    # read x, dy (+ r), write dx (+ dr)
    return fwd + (bwd if case.endswith("bwd") else 0)


# -------------------------------------------------------------------------------------------------
# Main
# -------------------------------------------------------------------------------------------------

def machine_info(device) -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
                platform=platform.platform())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        return info
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "L2 cache", "L3 cache"):
                info[key.strip()] = val.strip()
    except OSError:
        pass
    try:
        import numba
        info["numba"] = numba.__version__
    except ImportError:
        pass
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 batch-2 shapes instead of 12")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--shapes", default=None, help="comma-separated shape names (default: all or --quick)")
    ap.add_argument("--target-seconds", type=float, default=0.25, help="timed seconds per median")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--thp", action="store_true",
                    help="THP_MEM_ALLOC_ENABLE=1: huge pages for large outputs (see the code)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    impl = "triton" if device.type == "cuda" else "cpu"
    timer = Timer(device)
    cases = [c for c in args.cases.split(",") if c]
    names = set(args.shapes.split(",")) if args.shapes else (QUICK if args.quick else None)
    shapes = [(n, s) for n, s in SHAPES if names is None or n in names]

    bw = copy_bandwidth(device, timer)
    info = machine_info(device)
    info.update(copy_GBps=round(bw / 1e9, 2), impl=impl, dtype=args.dtype, G=G,
                THP_MEM_ALLOC_ENABLE=os.environ.get("THP_MEM_ALLOC_ENABLE", "0"))
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    print(f"{'shape':<13}{'layout':<7}{'case':<10}{'native ms':>17}{'ours ms':>17}{'speedup':>8}"
          f"{'ours %floor':>12}{'native %floor':>14}")
    rows = []
    t_all = time.perf_counter()
    for name, shape in shapes:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        nsets = max(2, min(16, math.ceil((96 << 20) / (4 * nbytes))))
        for cl in (False, True):
            fmt = (torch.channels_last if len(shape) == 4 else torch.channels_last_3d) if cl \
                else torch.contiguous_format
            sets = make_sets(shape, fmt, dtype, device, nsets)
            iters = dict(min_iters=5, target_s=args.target_seconds, max_iters=200)
            for case in cases:
                meas = {"native": [], "ours": []}
                for _ in range(2):   # interleaved twice: the spread of the two medians
                    for who, fn in (("native", native), ("ours", ours)):
                        meas[who].append(median_time(timer, lambda s: fn(s, case, impl), sets, **iters))
                nat, our = min(meas["native"]), min(meas["ours"])
                floor_t = floor_bytes(shape, dtype.itemsize, case) / bw
                row = dict(shape=name, dims=list(shape), layout="channels_last" if cl else "nchw",
                           case=case, native_ms=[t * 1e3 for t in meas["native"]],
                           ours_ms=[t * 1e3 for t in meas["ours"]], speedup=nat / our,
                           ours_floor=floor_t / our, native_floor=floor_t / nat)
                rows.append(row)
                fmt_ms = lambda v: f"{v[0]:7.2f}/{v[1]:<7.2f}"  # noqa: E731
                print(f"{name:<13}{row['layout'][:6]:<7}{case:<10}{fmt_ms(row['native_ms']):>17}"
                      f"{fmt_ms(row['ours_ms']):>17}{row['speedup']:7.2f}x{row['ours_floor']:11.0%}"
                      f"{row['native_floor']:13.0%}", flush=True)
            del sets
    bw_end = copy_bandwidth(device, timer)
    if bw_end > bw:   # the floor uses the better measurement: rescale the fractions
        for row in rows:
            row["ours_floor"] *= bw / bw_end
            row["native_floor"] *= bw / bw_end
        print(f"copy bandwidth at the end {bw_end / 1e9:.2f} GB/s (start {bw / 1e9:.2f}): "
              f"%floor columns above overstate by {bw_end / bw:.2f}x; the summary and JSON use it")
    info["copy_GBps_end"] = round(bw_end / 1e9, 2)
    summary = summarize(rows)
    print(f"total {time.perf_counter() - t_all:.0f} s")
    for line in summary["lines"]:
        print(line)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(machine=info, rows=rows, summary=summary), indent=1))


def summarize(rows) -> dict:
    """Geometric-mean speedups per (layout, case) and the worst fraction of the floor (fwd)."""
    out = {"lines": []}
    for layout in ("nchw", "channels_last"):
        for case in CASES:
            sel = [r for r in rows if r["layout"] == layout and r["case"] == case]
            if not sel:
                continue
            gm = math.exp(sum(math.log(r["speedup"]) for r in sel) / len(sel))
            worst = min(sel, key=lambda r: r["speedup"])
            floor_min = min(r["ours_floor"] for r in sel)
            out[f"{layout}/{case}"] = dict(geomean_speedup=gm, min_speedup=worst["speedup"],
                                           min_floor=floor_min)
            out["lines"].append(f"{layout:<14}{case:<10} speedup geomean {gm:5.2f}x, min "
                                f"{worst['speedup']:5.2f}x ({worst['shape']}); ours %floor min "
                                f"{floor_min:.0%}")
    return out


if __name__ == "__main__":
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".numba_cache"))
    main()
