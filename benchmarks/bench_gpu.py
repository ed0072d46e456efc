"""Group Norm on a CUDA GPU: our Triton backend against torch, eager and compiled, and in a ResNet-50 step.

    python benchmarks/bench_gpu.py --json out/bench_gpu.json        # one command, < 5 min on an H200
    python benchmarks/bench_gpu.py --host --json out/host.json      # no GPU needed: the host path, launches stubbed
    python benchmarks/bench_gpu.py --dry                            # smoke test on the CPU (interpreter, tiny)

Sections (each row is timed only while the time budget lasts, ``--budget``, default 285 s;
a row that fails prints its error in the table and the run goes on; the JSON is rewritten after every row):

1. env: GPU, versions, copy bandwidth (a 1 GiB device copy, read + write, CUDA-graph replay).
2. host: a tensor small enough that GPU time does not matter: eager wall time per call of the forward and
   of forward + backward, ours (through groupnorm.nn.GroupNorm, the user's view; and the backend's
   group_norm) against torch; launches per call and how they launch (direct / JIT).
3. check: ours against torch in float64 on the GPU (forward, all gradients), bitwise determinism, float32
   at mean 1e6 (std 0.1).
4. table: per shape x dtype x layout x mode (fwd, fwd fused = silu(GN + residual), train = fwd + backward,
   train fused): eager wall time (the user's view: per call of back-to-back calls, GPU queue included) and
   kernel time (CUDA-graph replay: no host time) for ours, torch eager (the same math: F.group_norm [+ r,
   silu]) and torch.nn.GroupNorm alone; ratios torch / ours; fraction of the copy floor (minimum bytes /
   copy bandwidth) of our kernel time. Shapes: U-Net stages at batch 2, a VAE decoder 1x256x256x256,
   ResNet-50 stages at batch 2 and 32, a detection stage 2x256x200x304, video 3D 2x256x8x28x28; bfloat16
   everywhere, float32 on the large ones.
5. resnet (run before the table): one training step (SGD) of torchvision's ResNet-50, bfloat16 autocast,
   channels_last, with BatchNorm, torch's GroupNorm, ours; and groupnorm.models.resnet50 with ours (its
   blocks fuse the residual add and ReLU into the norm), at batch 32 and 2.
6. compile: torch.compile (Inductor) of torch's GN + add + SiLU against torch.compile of ours (Inductor
   launches our kernels), fused bfloat16 channels_last rows, eager wall and kernel time. The table stops
   60 s before the budget ends to leave this section its time.

Method: one process; inputs rotate among enough independent sets to exceed the L2 cache; warm-up calls
first (compiles, plans, allocator); medians of rounds of back-to-back calls; ours and torch are measured
twice, interleaved (A B A B), and the better median of each is used (both are in the JSON).

``--host`` (no GPU): groupnorm.kernels.triton's launches are replaced by a counting no-op and its plans
are made for 132 SMs; on CPU tensors it measures what our Python costs per call (plan lookup, allocations,
autograd) and counts the launches per plan type (single / loop / split).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

if "--dry" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"   # before Triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import groupnorm  # noqa: E402
from groupnorm import backends  # noqa: E402

G = 32
EPS = 1e-5
SHAPES = [  # name, shape, also in float32 (the large shapes, for the copy-floor target)
    ("unet64 b2", (2, 320, 64, 64), True),
    ("unet32 b2", (2, 640, 32, 32), False),
    ("unet16 b2", (2, 1280, 16, 16), False),
    ("vae 1x256x256", (1, 256, 256, 256), True),
    ("det 2x256x200x304", (2, 256, 200, 304), True),
    ("r50s1 b32", (32, 256, 56, 56), True),
    ("r50s2 b32", (32, 512, 28, 28), True),
    ("r50s3 b32", (32, 1024, 14, 14), False),
    ("r50s4 b32", (32, 2048, 7, 7), False),
    ("r50s1 b2", (2, 256, 56, 56), False),
    ("r50s2 b2", (2, 512, 28, 28), False),
    ("r50s3 b2", (2, 1024, 14, 14), False),
    ("r50s4 b2", (2, 2048, 7, 7), False),
    ("video3d b2", (2, 256, 8, 28, 28), False),
]
COMPILE_SHAPES = ["unet64 b2", "unet16 b2", "r50s1 b32", "det 2x256x200x304"]
MODES = ("fwd", "fwd fused", "train", "train fused")


# ---- output ---------------------------------------------------------------------------------------------------
class Report:
    """Prints rows as they come and rewrites the JSON after each one, so a cut run keeps what it measured."""

    def __init__(self, path, budget):
        self.path, self.data = path, {"sections": {}, "errors": []}
        self.t0, self.budget = time.perf_counter(), budget

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def add(self, section, row):
        self.data["sections"].setdefault(section, []).append(row)
        self.save()

    def save(self):
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(self.path) + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            tmp.replace(self.path)


def log(*args):
    print(*args, flush=True)


def fmt(v, spec=".3f"):
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def error_text(exc) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]


# ---- timing -----------------------------------------------------------------------------------------------------
class Clock:
    """Eager wall time and CUDA-graph kernel time on a GPU; wall time only on the CPU (--dry)."""

    def __init__(self, device, rounds=5, calls=10, warmup=3, stat=statistics.median):
        self.cuda = device.type == "cuda"
        self.rounds, self.calls, self.warmup, self.stat = rounds, calls, warmup, stat

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def eager_ms(self, fn, nsets, warmup=None):
        """Median over rounds of (time of `calls` back-to-back calls, rotating input sets) / calls."""
        for i in range(self.warmup if warmup is None else warmup):
            fn(i % nsets)
        self.sync()
        times = []
        for r in range(self.rounds):
            t = time.perf_counter()
            for j in range(self.calls):
                fn((r * self.calls + j) % nsets)
            self.sync()
            times.append((time.perf_counter() - t) / self.calls * 1e3)
        return self.stat(times)

    def graph_ms(self, fn, nsets, warmup=3):
        """Kernel time: `calls` calls (rotating sets) captured in one CUDA graph, replayed; median per call."""
        if not self.cuda:
            return None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(warmup):
                fn(i % nsets)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for j in range(self.calls):
                fn(j % nsets)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / self.calls)
        del graph
        return statistics.median(times)

    def pair(self, ours, theirs, nsets, graph=True):
        """Ours and theirs, eager twice interleaved (A B A B), then graph: dict of medians."""
        out = {}
        e = [self.eager_ms(ours, nsets), self.eager_ms(theirs, nsets), self.eager_ms(ours, nsets),
             self.eager_ms(theirs, nsets)]
        out["ours_eager"], out["torch_eager"] = min(e[0], e[2]), min(e[1], e[3])
        out["ours_eager_runs"], out["torch_eager_runs"] = [e[0], e[2]], [e[1], e[3]]
        if graph:
            out["ours_kernel"], out["torch_kernel"] = self.graph_ms(ours, nsets), self.graph_ms(theirs, nsets)
        return out


def copy_bandwidth(clock, device) -> float:
    """Bytes per second of a device-to-device copy (read + write), kernel time."""
    n = 2**30 if clock.cuda else 2**24
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = clock.graph_ms(lambda i: dst.copy_(src), 1) if clock.cuda else clock.eager_ms(lambda i: dst.copy_(src), 1)
    del src, dst
    return 2 * n / (ms * 1e-3)


# ---- the functions being timed ------------------------------------------------------------------------------------
def in_layout(x, layout):
    if layout == "cl":
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x.contiguous()


def make_sets(shape, dtype, layout, device, train, count):
    sets = []
    for i in range(count):
        g = torch.Generator(device=device).manual_seed(i)
        x = in_layout(torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(2).add_(1), layout)
        x = x.to(dtype).requires_grad_(train)
        r = in_layout(torch.randn(shape, generator=g, device=device, dtype=torch.float32), layout).to(dtype)
        dy = in_layout(torch.randn(shape, generator=g, device=device, dtype=torch.float32), layout).to(dtype)
        sets.append((x, r.requires_grad_(train), dy))
    return sets


def set_count(shape, dtype, cuda):
    """Enough independent input sets that one call's data is not in L2 from the previous one (> 120 MB)."""
    if not cuda:
        return 2
    per_set = 3 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return int(min(32, max(2, math.ceil(120e6 / per_set))))


def callables(shape, dtype, layout, mode, device, nsets):
    """(ours, torch, torch nn.GroupNorm alone) as f(i) on input set i, and the modules."""
    c = shape[1]
    fused, train = "fused" in mode, mode.startswith("train")
    ours = groupnorm.nn.GroupNorm(G, c, eps=EPS, activation="silu" if fused else None).to(device, dtype)
    theirs = torch.nn.GroupNorm(G, c, eps=EPS).to(device, dtype)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, c))
            m.bias.copy_(torch.linspace(-0.5, 0.5, c))
    sets = make_sets(shape, dtype, layout, device, train, nsets)
    w, b = theirs.weight, theirs.bias

    def torch_math(x, r):
        y = F.group_norm(x, G, w, b, EPS)
        return F.silu(y + r) if fused else y

    def ours_call(x, r):
        return ours(x, residual=r) if fused else ours(x)

    def wrap(fn, params, uses_r=fused):
        if not train:
            def run(i):
                x, r, _ = sets[i]
                with torch.no_grad():
                    return fn(x, r)
            return run

        def run(i):
            x, r, dy = sets[i]
            y = fn(x, r)
            inputs = [x, *params] + ([r] if uses_r else [])
            return torch.autograd.grad(y, inputs, dy)
        return run

    def bare(x, r):
        return theirs(x)
    return (wrap(ours_call, [ours.weight, ours.bias]), wrap(torch_math, [w, b]),
            wrap(bare, [w, b], uses_r=False), sets, ours, theirs)


def floor_bytes(shape, dtype, mode):
    nb = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    f = 1 if "fused" in mode else 0
    fwd = 2 + f                      # read x (+ r), write y
    bwd = 3 + 2 * f                  # read dy, x (+ r), write dx (+ dresidual)
    return nb * (fwd + bwd if mode.startswith("train") else fwd)


def accuracy(ours_fn, torch_fn, sets, train):
    """max |ours - torch| / max |torch| on set 0 (torch's result computed as it is, same dtype)."""
    a, b = ours_fn(0), torch_fn(0)
    a = [a] if not train else list(a)
    b = [b] if not train else list(b)
    errs = [((p.double() - q.double()).abs().max() / q.double().abs().max().clamp_min(1e-30)).item()
            for p, q in zip(a, b)]
    return max(errs)


# ---- sections -----------------------------------------------------------------------------------------------------
def section_env(rep, device, clock):
    info = dict(python=platform.python_version(), torch=torch.__version__, device=str(device))
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"missing: {exc}"
    if clock.cuda:
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count, cuda=torch.version.cuda,
                    memory_gib=round(props.total_memory / 2**30, 1))
    info["triton_backend"] = backends.available("triton") or "available"
    info["copy_gbs"] = copy_bandwidth(clock, device) / 1e9
    rep.data["env"] = info
    rep.save()
    log("env:", json.dumps(info))
    return info["copy_gbs"] * 1e9


def section_host(rep, device, clock):
    """Small tensors: the host path decides the time."""
    from groupnorm.kernels import triton as gt
    log("\n== host path: eager wall per call on a small tensor (us)")
    log(f"{'case':34s} {'ours module':>12s} {'ours backend':>13s} {'torch':>9s} {'launches':>9s}")
    shapes = [((2, 64, 8, 8), torch.float32, "nchw"), ((2, 64, 8, 8), torch.bfloat16, "cl")]
    if not clock.cuda:
        shapes = [((2, 64, 2, 2), torch.float32, "cl")]
    for shape, dtype, layout in shapes:
        for mode in MODES:
            name = f"{'x'.join(map(str, shape))} {str(dtype)[6:]} {layout} {mode}"
            try:
                ours, theirs, _, sets, mod, _ = callables(shape, dtype, layout, mode, device, 2)
                fused, train = "fused" in mode, mode.startswith("train")

                def backend(i):   # the backend's entry point itself, without module, _checks and registry
                    x, r, dy = sets[i]
                    ctx = contextlib.nullcontext() if train else torch.no_grad()
                    with ctx:
                        y = gt.group_norm(x, G, mod.weight, mod.bias, EPS, "silu" if fused else None,
                                          r if fused else None)
                    if train:
                        return torch.autograd.grad(y, [x, mod.weight, mod.bias] + ([r] if fused else []), dy)
                    return y
                times = [clock.eager_ms(f, 2, warmup=5 if clock.cuda else 1) * 1e3
                         for f in (ours, backend, theirs, ours, backend, theirs)]
                counts = count_launches(gt, lambda: ours(0))
                row = dict(case=name, ours_module_us=min(times[0], times[3]), ours_backend_us=min(times[1], times[4]),
                           torch_us=min(times[2], times[5]), launches=counts,
                           launch_path=dict(gt._launch_notes))
                log(f"{name:34s} {row['ours_module_us']:12.1f} {row['ours_backend_us']:13.1f} "
                    f"{row['torch_us']:9.1f} {sum(counts.values()):9d}")
            except Exception as exc:  # noqa: BLE001
                row = dict(case=name, error=error_text(exc))
                log(f"{name:34s} ERROR {row['error']}")
            rep.add("host", row)
    log(f"launch paths: {dict(gt._launch_notes)}")


def count_launches(gt, fn):
    """Kernel launches of one call (a counting wrapper around the launches, outside the timed runs)."""
    counts = {}
    real = gt._Launch.__call__

    def counting(self, stream, args):
        counts[self.kernel.__name__] = counts.get(self.kernel.__name__, 0) + 1
        return real(self, stream, args)
    gt._Launch.__call__ = counting
    try:
        fn()
    finally:
        gt._Launch.__call__ = real
    return counts


def section_check(rep, device, clock):
    """Ours against torch in float64 on the GPU, determinism, large means."""
    log("\n== check: ours vs torch float64 (max err / max |ref|), bitwise determinism")
    cases = [((2, 320, 64, 64), torch.float32, "cl", "silu"), ((32, 512, 28, 28), torch.float32, "nchw", None),
             ((1, 256, 128, 128), torch.bfloat16, "cl", "gelu"), ((2, 64, 8, 8), torch.float32, "cl", "relu")]
    if not clock.cuda:
        cases = [((2, 64, 2, 2), torch.float32, "cl", "silu")]
    for shape, dtype, layout, act in cases:
        for mean, std in ((1.0, 2.0), (1e6, 0.1)):
            if mean > 1 and dtype != torch.float32:
                continue
            name = f"{'x'.join(map(str, shape))} {str(dtype)[6:]} {layout} {act} mean {mean:g}"
            try:
                row = dict(case=name, **check_case(shape, dtype, layout, act, mean, std, device))
                log(f"{name:44s} y {row['y']:.1e} dx {row['dx']:.1e} dw {row['dw']:.1e} db {row['db']:.1e} "
                    f"dr {row['dr']:.1e} deterministic {row['deterministic']}")
            except Exception as exc:  # noqa: BLE001
                row = dict(case=name, error=error_text(exc))
                log(f"{name:44s} ERROR {row['error']}")
            rep.add("check", row)


def check_case(shape, dtype, layout, act, mean, std, device):
    c = shape[1]
    g = torch.Generator(device=device).manual_seed(0)
    x64 = in_layout(torch.randn(shape, generator=g, device=device, dtype=torch.float64) * std + mean, layout)
    r64 = in_layout(torch.randn(shape, generator=g, device=device, dtype=torch.float64), layout)
    dy64 = in_layout(torch.randn(shape, generator=g, device=device, dtype=torch.float64), layout)
    w64 = torch.linspace(0.5, 1.5, c, device=device, dtype=torch.float64)
    b64 = torch.linspace(-0.5, 0.5, c, device=device, dtype=torch.float64)
    x, r, dy = (t.to(dtype) for t in (x64, r64, dy64))
    w, b = w64.float(), b64.float()

    def ours():
        leaves = [t.detach().requires_grad_() for t in (x, w, b, r)]
        y = groupnorm.functional.group_norm(leaves[0], G, leaves[1], leaves[2], EPS, activation=act,
                                            residual=leaves[3])
        return [y, *torch.autograd.grad(y, leaves, dy)]

    first, second = ours(), ours()
    # reference: the same rounded inputs in float64, shifted by each group's first value (exact; GN is
    # shift invariant) so that torch's float64 mean does not round at large means
    xr = x.double()
    shift = xr.reshape(shape[0], G, -1)[:, :, :1].expand(shape[0], G, xr[0].numel() // G).reshape(shape)
    leaves = [t.detach().requires_grad_() for t in (xr - shift, w64, b64, r.double())]
    z = F.group_norm(leaves[0], G, leaves[1], leaves[2], EPS) + leaves[3]
    y = {None: z, "relu": F.relu(z), "silu": F.silu(z), "gelu": F.gelu(z)}[act]
    ref = [y, *torch.autograd.grad(y, leaves, dy.double())]
    err = {name: ((a.double() - e).abs().max() / e.abs().max()).item()
           for name, a, e in zip(("y", "dx", "dw", "db", "dr"), first, ref)}
    err["deterministic"] = all(torch.equal(a, c) for a, c in zip(first, second))
    err["backend"] = backends.resolve(x).__name__
    return err


def section_table(rep, device, clock, bandwidth, quick, reserve=0.0):
    """The main table; stops `reserve` seconds before the budget ends (left to the compile section)."""
    log("\n== table: eager wall time and kernel time (CUDA graph), ms per call; x = torch / ours")
    head = (f"{'shape':20s} {'dtype':5s} {'lay':4s} {'mode':11s} | {'ours':>7s} {'torch':>7s} {'x':>5s} "
            f"{'nn.GN':>7s} {'x':>5s} | {'k ours':>7s} {'k torch':>7s} {'x':>5s} {'floor':>5s} | err")
    log(head)
    rows = []
    for name, shape, also_fp32 in SHAPES:
        for dtype in (torch.bfloat16, torch.float32) if also_fp32 else (torch.bfloat16,):
            for layout in ("cl", "nchw"):
                rows.append((name, shape, dtype, layout))
    rows.sort(key=lambda r: (r[2] != torch.bfloat16, r[3] != "cl"))   # bf16 channels_last first
    if quick:
        rows = rows[:6]
    if not clock.cuda:
        rows = [("tiny", (2, 64, 2, 2), torch.float32, "cl"), ("tiny", (2, 64, 2, 2), torch.bfloat16, "nchw")]
        rows = rows[:1] if quick else rows
    for name, shape, dtype, layout in rows:
        for mode in MODES:
            label = f"{name:20s} {str(dtype)[6:][:5]:5s} {layout:4s} {mode:11s}"
            if rep.left() < reserve:
                rep.add("table", dict(shape=name, dtype=str(dtype), layout=layout, mode=mode, skipped="budget"))
                continue
            try:
                row = table_row(name, shape, dtype, layout, mode, device, clock, bandwidth)
                log(f"{label} | {row['ours_eager']:7.3f} {row['torch_eager']:7.3f} {row['x_eager']:5.2f} "
                    f"{row['nn_eager']:7.3f} {row['x_nn']:5.2f} | {fmt(row.get('ours_kernel'), '7.4f')} "
                    f"{fmt(row.get('torch_kernel'), '7.4f')} {fmt(row.get('x_kernel'), '5.2f')} "
                    f"{fmt(row.get('floor'), '5.0%')} | {row['err']:.1e}")
            except Exception as exc:  # noqa: BLE001
                row = dict(shape=name, dtype=str(dtype), layout=layout, mode=mode, error=error_text(exc))
                log(f"{label} | ERROR {row['error']}")
                recover(clock)
            rep.add("table", row)
    summarize(rep)


def table_row(name, shape, dtype, layout, mode, device, clock, bandwidth):
    nsets = set_count(shape, dtype, clock.cuda)
    ours, theirs, bare, sets, mod, _ = callables(shape, dtype, layout, mode, device, nsets)
    train = mode.startswith("train")
    row = dict(shape=name, dims=list(shape), dtype=str(dtype), layout=layout, mode=mode, sets=nsets,
               backend=backends.resolve(sets[0][0]).__name__)
    row["err"] = accuracy(ours, theirs, sets, train)
    row.update(clock.pair(ours, theirs, nsets))
    row["nn_eager"] = clock.eager_ms(bare, nsets)
    row["x_eager"] = row["torch_eager"] / row["ours_eager"]
    row["x_nn"] = row["nn_eager"] / row["ours_eager"]
    if row.get("ours_kernel"):
        row["x_kernel"] = row["torch_kernel"] / row["ours_kernel"]
        row["floor"] = floor_bytes(shape, dtype, mode) / bandwidth / (row["ours_kernel"] * 1e-3)
    try:
        from groupnorm.kernels import triton as gt
        row["plans"] = sorted({p.kind for key, p in gt._PLANS.items() if tuple(key[1]) == tuple(shape)})
    except Exception:  # noqa: BLE001
        pass
    del sets
    return row


def recover(clock):
    """After a failed row: drop what it held (an out-of-memory error must not fail the next rows)."""
    try:
        if clock.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception as exc:  # noqa: BLE001  (a sticky CUDA error: every later row will say so)
        log(f"   (CUDA state after the error: {error_text(exc)})")


def summarize(rep):
    rows = [r for r in rep.data["sections"].get("table", []) if "x_eager" in r]
    if not rows:
        return
    summary = {}
    for mode in MODES:
        sel = [r for r in rows if r["mode"] == mode]
        if sel:
            xs = [r["x_eager"] for r in sel]
            summary[mode] = dict(rows=len(sel), min_x_eager=min(xs),
                                 geomean_x_eager=math.exp(statistics.fmean(math.log(v) for v in xs)))
    big = [r for r in rows if r.get("floor") and math.prod(r["dims"]) * (2 if "bfloat16" in r["dtype"] else 4) >= 32e6]
    if big:
        summary["large_shapes_floor_min"] = min(r["floor"] for r in big)
        summary["large_shapes_floor_by_row"] = {f"{r['shape']} {r['dtype'][6:]} {r['layout']} {r['mode']}": r["floor"]
                                                for r in big}
    rep.data["summary"] = summary
    rep.save()
    log("\nsummary (x = torch eager / ours eager):")
    for mode, s in summary.items():
        if isinstance(s, dict) and "rows" in s:
            log(f"  {mode:11s} rows {s['rows']:3d}  min x {s['min_x_eager']:.2f}  geomean x {s['geomean_x_eager']:.2f}")
    if big:
        log(f"  large shapes (>= 32 MB): our kernel time at >= {summary['large_shapes_floor_min']:.0%} of the copy floor")


def section_compile(rep, device, clock):
    log("\n== compile: torch.compile of torch's GN + add + SiLU vs torch.compile of ours (ms per call)")
    log(f"{'shape':20s} {'mode':11s} | {'ours':>7s} {'inductor':>8s} {'x':>5s} | {'k ours':>7s} {'k ind':>7s} {'x':>5s}")
    if not clock.cuda:
        names = [("tiny", (2, 64, 2, 2))]
    else:
        names = [(n, s) for n, s, _ in SHAPES if n in COMPILE_SHAPES]
    for name, shape in names:
        for mode in ("fwd fused", "train fused"):
            label = f"{name:20s} {mode:11s}"
            if rep.left() < 0:
                rep.add("compile", dict(shape=name, mode=mode, skipped="budget"))
                continue
            try:
                row = compile_row(name, shape, mode, device, clock)
                log(f"{label} | {row['ours_eager']:7.3f} {row['torch_eager']:8.3f} {row['x_eager']:5.2f} | "
                    f"{fmt(row.get('ours_kernel'), '7.4f')} {fmt(row.get('torch_kernel'), '7.4f')} "
                    f"{fmt(row.get('x_kernel'), '5.2f')}")
            except Exception as exc:  # noqa: BLE001
                row = dict(shape=name, mode=mode, error=error_text(exc))
                log(f"{label} | ERROR {row['error']}")
                recover(clock)
            rep.add("compile", row)


def compile_row(name, shape, mode, device, clock):
    dtype, layout = torch.bfloat16, "cl"
    train = mode.startswith("train")
    nsets = set_count(shape, dtype, clock.cuda)
    sets = make_sets(shape, dtype, layout, device, train, nsets)
    c = shape[1]
    ours = groupnorm.nn.GroupNorm(G, c, eps=EPS, activation="silu").to(device, dtype)
    theirs = torch.nn.GroupNorm(G, c, eps=EPS).to(device, dtype)
    torch._dynamo.reset()
    backend = "inductor" if clock.cuda else "aot_eager"
    ours_c = torch.compile(lambda x, r: ours(x, residual=r), fullgraph=True, dynamic=False, backend=backend)
    torch_c = torch.compile(lambda x, r: F.silu(theirs(x) + r), fullgraph=True, dynamic=False, backend=backend)

    def wrap(fn, params):
        def run(i):
            x, r, dy = sets[i]
            if not train:
                with torch.no_grad():
                    return fn(x, r)
            y = fn(x, r)
            return torch.autograd.grad(y, [x, r, *params], dy)
        return run
    o, t = wrap(ours_c, [ours.weight, ours.bias]), wrap(torch_c, [theirs.weight, theirs.bias])
    t0 = time.perf_counter()
    o(0)
    t(0)
    row = dict(shape=name, dims=list(shape), mode=mode, compile_s=time.perf_counter() - t0)
    row.update(clock.pair(o, t, nsets))
    row["x_eager"] = row["torch_eager"] / row["ours_eager"]
    if row.get("ours_kernel"):
        row["x_kernel"] = row["torch_kernel"] / row["ours_kernel"]
    return row


def section_resnet(rep, device, clock, quick):
    log("\n== ResNet-50 training step (SGD), bfloat16 autocast, channels_last: ms per step")
    try:
        import torchvision
    except ImportError as exc:
        rep.add("resnet", dict(error=error_text(exc)))
        log(f"torchvision missing: {exc}")
        return
    from groupnorm.models import resnet50 as our_resnet50
    variants = {
        "torchvision BN": lambda: torchvision.models.resnet50(),
        "torchvision torch GN": lambda: torchvision.models.resnet50(norm_layer=lambda c: torch.nn.GroupNorm(G, c)),
        "torchvision our GN": lambda: torchvision.models.resnet50(norm_layer=lambda c: groupnorm.nn.GroupNorm(G, c)),
        "groupnorm.models our GN (fused blocks)": lambda: our_resnet50(norm="gn"),
    }
    batches = (32, 2) if clock.cuda else (2,)
    size = 224 if clock.cuda else 32
    for batch in batches:
        base = None
        for name, build in variants.items():
            label = f"batch {batch:2d} {name:40s}"
            if rep.left() < 0:
                rep.add("resnet", dict(batch=batch, variant=name, skipped="budget"))
                continue
            try:
                # --dry: torch's ops for "ours" too (the interpreter would take minutes per step)
                with contextlib.nullcontext() if clock.cuda else groupnorm.use_backend("native"):
                    ms = resnet_step_ms(build, batch, size, device, clock, quick)
                base = ms if name == "torchvision BN" else base
                row = dict(batch=batch, variant=name, ms_per_step=ms, images_per_s=batch / ms * 1e3,
                           vs_bn=None if base is None else ms / base)
                log(f"{label} {ms:8.2f} ms  {row['images_per_s']:8.0f} img/s  "
                    f"{'' if base is None else f'x BN {ms / base:.2f}'}")
            except Exception as exc:  # noqa: BLE001
                row = dict(batch=batch, variant=name, error=error_text(exc))
                log(f"{label} ERROR {row['error']}")
                recover(clock)
            rep.add("resnet", row)


def resnet_step_ms(build, batch, size, device, clock, quick):
    torch.manual_seed(0)
    model = build().to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=device)
    dtype = torch.bfloat16

    def step():
        with torch.autocast(device.type, dtype=dtype):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(3 if clock.cuda else 1):
        step()
    clock.sync()
    steps = 5 if quick else 10 if clock.cuda else 1
    times = []
    for _ in range(3 if clock.cuda else 1):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        clock.sync()
        times.append((time.perf_counter() - t) / steps * 1e3)
    del model, opt
    return statistics.median(times)


# ---- --host: the host path on the CPU, launches stubbed --------------------------------------------------------------
def route_cpu_to_triton():
    """Make backend "auto" pick "triton" for CPU tensors, as it does for CUDA ones (--host, --dry)."""
    from groupnorm.kernels import triton as gt
    backends._reasons.pop("triton", None)
    backends._loaded["triton"] = gt
    backends._AUTO_PREFERS["cpu"] = "triton"
    backends._auto_modules.clear()
    backends._triton_devices = lambda: ("cuda", "cpu")


HOST_CASES = [("single", (2, 64, 8, 8)), ("loop", (32, 256, 56, 56)), ("split", (2, 320, 64, 64))]


def run_host(rep, quick=False):
    """Our Python per call with every kernel launch replaced by a counting no-op, plans as for 132 SMs."""
    from groupnorm.kernels import triton as gt
    counts = {}

    def stub(self, stream, args):
        counts[self.kernel.__name__] = counts.get(self.kernel.__name__, 0) + 1
    gt._Launch.__call__ = stub
    gt._sm_count = lambda index: 132
    gt._INTERPRET = False                 # plans as on a GPU (nothing is launched)
    route_cpu_to_triton()
    # the best round: on a shared CPU other processes only ever add time to ours
    clock = Clock(torch.device("cpu"), rounds=3 if quick else 15, calls=20 if quick else 100, stat=min)
    log("== host path per call on the CPU, kernel launches stubbed (us, best of 15 rounds of 100 calls); "
        "launches per call")
    log(f"{'plan':7s} {'shape':16s} {'layout':6s} {'mode':11s} {'module':>8s} {'backend':>8s} {'impl':>7s} "
        f"{'launches':>8s}")
    for kind, shape in HOST_CASES[:1] if quick else HOST_CASES:
        for layout in ("cl", "nchw"):
            for mode in MODES:
                row = host_row(gt, clock, counts, kind, shape, layout, mode)
                rep.add("host_cpu", row)
                log(f"{kind:7s} {'x'.join(map(str, shape)):16s} {layout:6s} {mode:11s} {row['module_us']:8.1f} "
                    f"{row['backend_us']:8.1f} {row['impl_us']:7.1f} {row['launches']:8d}  {row['plans']}")
    # the autograd engine's own cost here, for scale: a one-op graph, forward + backward
    a = torch.randn(2, 64, 8, 8, requires_grad=True)
    g = torch.randn(2, 64, 8, 8)
    engine = clock.eager_ms(lambda i: torch.autograd.grad(a * 1.0, [a], g), 1) * 1e3
    rep.data["autograd_one_op_fwd_bwd_us"] = engine
    rep.save()
    log(f"for scale: torch autograd, one elementwise op forward + backward on this CPU: {engine:.1f} us")


def host_row(gt, clock, counts, kind, shape, layout, mode):
    c = shape[1]
    fused, train = "fused" in mode, mode.startswith("train")
    mod = groupnorm.nn.GroupNorm(G, c, activation="silu" if fused else None)
    x = in_layout(torch.randn(shape), layout).requires_grad_(train)
    r = torch.randn_like(x).requires_grad_(train)
    dy = torch.randn_like(x)
    act = gt._ACT_CODES["silu" if fused else None]
    w, b = mod.weight, mod.bias

    def module(i):
        if not train:
            with torch.no_grad():
                return mod(x, residual=r) if fused else mod(x)
        y = mod(x, residual=r) if fused else mod(x)
        return torch.autograd.grad(y, [x, w, b] + ([r] if fused else []), dy)

    def backend(i):
        if not train:
            with torch.no_grad():
                return gt.group_norm(x, G, w, b, EPS, "silu" if fused else None, r if fused else None)
        y = gt.group_norm(x, G, w, b, EPS, "silu" if fused else None, r if fused else None)
        return torch.autograd.grad(y, [x, w, b] + ([r] if fused else []), dy)

    xd, wd, bd, rd = x.detach(), w.detach(), b.detach(), r.detach()
    _, stats = gt._forward_impl(xd, wd, bd, rd if fused else None, G, EPS, act)

    def impl(i):   # our code alone: plan lookup, allocations, launches (stubbed), no autograd
        gt._forward_impl(xd, wd, bd, rd if fused else None, G, EPS, act)
        if train:
            gt._backward_impl(dy, xd, wd, bd, rd if fused else None, stats, G, act, True, True, True, fused)
    times = {}
    for label, fn in (("module", module), ("backend", backend), ("impl", impl)):
        times[label] = clock.eager_ms(fn, 1, warmup=20) * 1e3
    counts.clear()
    module(0)
    launches = dict(counts)
    return dict(plan=kind, shape=list(shape), layout=layout, mode=mode, module_us=times["module"],
                backend_us=times["backend"], impl_us=times["impl"], launches=sum(launches.values()),
                kernels=launches, plans=sorted({p.kind for k, p in gt._PLANS.items() if tuple(k[1]) == shape}))


# ---- main ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here (rewritten after every row)")
    ap.add_argument("--budget", type=float, default=285.0, help="seconds; rows beyond it are skipped")
    ap.add_argument("--quick", action="store_true", help="a few rows per section")
    ap.add_argument("--host", action="store_true", help="CPU host path with launches stubbed (no GPU needed)")
    ap.add_argument("--dry", action="store_true", help="smoke test on the CPU (Triton interpreter, tiny shapes)")
    ap.add_argument("--sections", default="env,host,check,resnet,table,compile",
                    help="comma-separated subset of env,host,check,resnet,table,compile (run in that order)")
    args = ap.parse_args(argv)
    rep = Report(args.json, args.budget)
    rep.data["argv"] = sys.argv[1:] if argv is None else argv
    if args.host:
        run_host(rep, args.quick)
        return 0
    cuda = torch.cuda.is_available() and not args.dry
    if not cuda and not args.dry:
        log("no CUDA GPU: run with --host (host path, launches stubbed) or --dry (smoke test)")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    clock = Clock(device) if cuda else Clock(device, rounds=1, calls=1, warmup=1)
    if not cuda:
        route_cpu_to_triton()
    sections = args.sections.split(",")
    bandwidth = 1e10
    steps = [("env", lambda: section_env(rep, device, clock)),
             ("host", lambda: section_host(rep, device, clock)),
             ("check", lambda: section_check(rep, device, clock)),
             ("resnet", lambda: section_resnet(rep, device, clock, args.quick)),
             ("table", lambda: section_table(rep, device, clock, bandwidth, args.quick,
                                             reserve=60.0 if "compile" in sections else 0.0)),
             ("compile", lambda: section_compile(rep, device, clock))]
    for name, fn in steps:
        if name not in sections:
            continue
        t = time.perf_counter()
        try:
            out = fn()
            if name == "env":
                bandwidth = out
        except Exception as exc:  # noqa: BLE001  (a section that fails does not stop the others)
            rep.data["errors"].append(dict(section=name, error=error_text(exc), trace=traceback.format_exc()[-2000:]))
            log(f"section {name} failed: {error_text(exc)}")
            recover(clock)
        rep.data.setdefault("section_s", {})[name] = round(time.perf_counter() - t, 1)
        rep.save()
    log(f"\ndone in {time.perf_counter() - rep.t0:.0f} s" + (f"; results in {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
