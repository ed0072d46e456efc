#!/usr/bin/env bash
# GPU check for the Triton GN kernels, for a session that has a CUDA GPU (H100 expected).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh      # results under $OUT (default: ./gpu_check_out)
#
# 1. (env) env.txt: GPU, driver, torch / triton versions.
# 2. (tests) test_triton.txt: tests/kernels/test_triton.py compiled for the GPU (no TRITON_INTERPRET),
#    plus the custom-op tests when present.
# 3. (bench) bench_kernels_cuda_{float32,bfloat16}.*: benchmarks/bench_kernels.py --device cuda (the
#    project's kernel benchmark, through the custom op).
# 4. (micro) triton_gpu.json / triton_gpu.csv: a self-contained micro-benchmark of the Triton kernels
#    against torch's native GN kernels (aten.native_group_norm and its backward), median of many CUDA-event
#    timed runs, fraction of the bandwidth floor (minimum bytes / bandwidth of a large copy measured in
#    the same run), batch 1 / 2 / 32, NCHW and channels_last, fp32 and bf16; plus large-shape checks
#    against float64 and bitwise determinism on the GPU.
# Each step runs under a time limit (9 min) and a failing step does not stop the next one. Pick steps with
# GPU_CHECK_STEPS="env tests micro bench" (the default; order as given). GPU_CHECK_DRY=1 runs only step 4,
# on the CPU through the Triton interpreter with tiny shapes (a smoke test of this script without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DRY=${GPU_CHECK_DRY:-0}

step_env() {
  {
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0), \
'SMs', torch.cuda.get_device_properties(0).multi_processor_count)" 2>&1
  } > "$OUT/env.txt"
  cat "$OUT/env.txt"
}

step_tests() {
  echo "== triton tests on the GPU"
  local tests=(tests/kernels/test_triton.py)
  [ -f tests/kernels/test_op.py ] && tests+=(tests/kernels/test_op.py)
  timeout 540 "$PY" -m pytest -q "${tests[@]}" --junitxml="$OUT/test_triton.xml" > "$OUT/test_triton.txt" 2>&1
  echo "pytest exit $?"; tail -5 "$OUT/test_triton.txt"
}

step_bench() {
  [ -f benchmarks/bench_kernels.py ] || { echo "no benchmarks/bench_kernels.py"; return; }
  local help dtype
  help=$("$PY" benchmarks/bench_kernels.py --help 2>&1 || true)
  for dtype in float32 bfloat16; do
    echo "== benchmarks/bench_kernels.py --device cuda --dtype $dtype"
    local args=(--device cuda --dtype "$dtype")
    if grep -q -- "--json" <<< "$help"; then args+=(--json "$OUT/bench_kernels_cuda_$dtype.json"); fi
    timeout 540 "$PY" benchmarks/bench_kernels.py "${args[@]}" > "$OUT/bench_kernels_cuda_$dtype.txt" 2>&1
    echo "bench_kernels exit $?"; tail -40 "$OUT/bench_kernels_cuda_$dtype.txt"
  done
}

step_micro() {
  echo "== triton kernel micro-benchmark"
  timeout 540 "$PY" - "$OUT" <<'EOF' 2>&1 | tee "$OUT/triton_gpu.txt"
import csv, json, math, os, sys, time
import torch
from groupnorm import reference
from groupnorm.kernels import triton as gt

out = sys.argv[1]
DRY = os.environ.get("GPU_CHECK_DRY") == "1"
dev = torch.device("cpu" if DRY else "cuda")
aten = torch.ops.aten


def timed(fn, reps=30, graph=True):
    """Median milliseconds of fn over `reps` runs (CUDA events, after warm-up). graph=True replays fn as
    a CUDA graph, which leaves out the host-side (Python, launch) overhead: the kernels' own time."""
    if DRY:
        t = time.perf_counter(); fn()
        return (time.perf_counter() - t) * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()  # compiles, autotunes, warms the allocator
    torch.cuda.current_stream().wait_stream(side)
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); run(); b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


src = torch.empty(2**16 if DRY else 2**28, dtype=torch.uint8, device=dev)  # 256 MiB: bandwidth yardstick
dst = torch.empty_like(src)
copy_ms = timed(lambda: dst.copy_(src), 20)
bandwidth = 2 * src.numel() / (copy_ms * 1e-3)
print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
del src, dst

SHAPES = [("r50_s1", 256, (56, 56)), ("r50_s2", 512, (28, 28)), ("r50_s3", 1024, (14, 14)),
          ("r50_s4", 2048, (7, 7)), ("unet_64", 320, (64, 64)), ("unet_32", 640, (32, 32)),
          ("unet_16", 1280, (16, 16)), ("video3d", 256, (8, 28, 28))]
BATCHES = (1, 2, 32)
if DRY:
    SHAPES, BATCHES = [("r50_s1", 64, (3, 3)), ("video3d", 32, (2, 2, 3))], (1, 2)
G = 32
rows = []
for name, c, spatial in SHAPES:
    for n in (2,) if name.startswith(("unet", "video")) else BATCHES:
        for layout in ("nchw", "cl"):
            for dtype in (torch.float32, torch.bfloat16):
                shape = (n, c, *spatial)
                fmt = torch.contiguous_format if layout == "nchw" else (
                    torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
                x = torch.randn(shape, device=dev, dtype=dtype).contiguous(memory_format=fmt)
                dy, r = torch.randn_like(x), torch.randn_like(x)
                w, b = torch.randn(c, device=dev), torch.randn(c, device=dev)
                wn, bn = w.to(dtype), b.to(dtype)  # torch's op wants parameters in x's dtype
                hw = math.prod(spatial)
                nbytes = x.numel() * x.element_size()
                _, mean, rstd = gt.forward(x, w, b, None, G, 1e-5, None)
                _, nmean, nrstd = aten.native_group_norm(x, wn, bn, n, c, hw, G, 1e-5)
                plan = gt._plan(n, G, c // G, hw, x.element_size(), layout != "nchw", dev)
                row = dict(shape=name, n=n, c=c, spatial="x".join(map(str, spatial)), layout=layout,
                           dtype=str(dtype).replace("torch.", ""), chunks=plan["chunks"],
                           block=f'{plan["block_s"]}x{plan["block_d"]}', warps=plan["num_warps"])
                fwd = lambda: gt.forward(x, w, b, None, G, 1e-5, None)
                bwd = lambda: gt.backward(dy, x, w, b, None, mean, rstd, G, None)
                row["fwd_ms"] = timed(fwd)
                row["fwd_eager_ms"] = timed(fwd, graph=False)
                row["native_fwd_ms"] = timed(lambda: aten.native_group_norm(x, wn, bn, n, c, hw, G, 1e-5))
                row["bwd_ms"] = timed(bwd)
                row["bwd_eager_ms"] = timed(bwd, graph=False)
                row["native_bwd_ms"] = timed(lambda: aten.native_group_norm_backward(
                    dy, x, nmean, nrstd, wn, n, c, hw, G, [True, True, True]))
                row["fused_ms"] = timed(lambda: gt.forward(x, w, b, r, G, 1e-5, "silu"))
                row["native_fused_ms"] = timed(lambda: torch.nn.functional.silu(
                    aten.native_group_norm(x, wn, bn, n, c, hw, G, 1e-5)[0] + r))
                # floors: forward reads x, writes y; backward reads dy and x, writes dx; fused adds r
                row["fwd_floor"] = 2 * nbytes / bandwidth / (row["fwd_ms"] * 1e-3)
                row["bwd_floor"] = 3 * nbytes / bandwidth / (row["bwd_ms"] * 1e-3)
                row["fused_floor"] = 3 * nbytes / bandwidth / (row["fused_ms"] * 1e-3)
                for k in ("fwd", "bwd", "fused"):
                    row[f"{k}_speedup"] = row[f"native_{k}_ms"] / row[f"{k}_ms"]
                rows.append(row)
                if len(rows) == 1:  # rows go to the CSV as they come, so a timeout keeps what was measured
                    csv_file = open(f"{out}/triton_gpu.csv", "w", newline="")
                    writer = csv.DictWriter(csv_file, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
                csv_file.flush()
                cols = "  ".join(f"{k} {row[k + '_ms']:.4f} ms (x{row[k + '_speedup']:.2f}, "
                                 f"{row[k + '_floor']:.0%} floor)" for k in ("fwd", "bwd", "fused"))
                print(f"{name:8s} n={n:2d} {layout:4s} {row['dtype']:8s} chunks={plan['chunks']:3d} {cols} "
                      f"eager fwd {row['fwd_eager_ms']:.4f} bwd {row['bwd_eager_ms']:.4f}", flush=True)
                del x, dy, r

# large shapes against the float64 reference (on the CPU), and bitwise determinism on the GPU
BIG = [((1, 256, 56, 56), 32, "cl", torch.float32, "silu"),
       ((32, 512, 28, 28), 32, "nchw", torch.float32, None),
       ((2, 320, 64, 64), 32, "cl", torch.bfloat16, "gelu")]
checks = []
for shape, g, layout, dtype, act in [((1, 64, 3, 3), 32, "cl", torch.float32, "silu")] if DRY else BIG:
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = (torch.randn(shape, device=dev) * 2 + 3).to(dtype).contiguous(memory_format=fmt)
    w, b = torch.randn(shape[1], device=dev), torch.randn(shape[1], device=dev)
    r, dy = torch.randn_like(x), torch.randn_like(x)
    y, mean, rstd = gt.forward(x, w, b, r, g, 1e-5, act)
    grads = gt.backward(dy, x, w, b, r, mean, rstd, g, act)
    y2, _, _ = gt.forward(x, w, b, r, g, 1e-5, act)
    grads2 = gt.backward(dy, x, w, b, r, mean, rstd, g, act)
    same = torch.equal(y, y2) and all(torch.equal(p, q) for p, q in zip(grads, grads2))
    cpu = [t.cpu() for t in (x, w, b, r, dy)]
    y_ref, _, _ = reference.normalize(cpu[0], "gn", g, cpu[1], cpu[2], 1e-5, act, cpu[3])
    ref = reference.normalize_backward(cpu[4], cpu[0], "gn", g, cpu[1], cpu[2], 1e-5, act, cpu[3])
    err = lambda a, e: float((a.double().cpu() - torch.from_numpy(e)).abs().max() / abs(e).max())
    check = dict(shape=list(shape), layout=layout, dtype=str(dtype), act=act, deterministic=same,
                 y=err(y, y_ref), dx=err(grads[0], ref["x"]), dw=err(grads[1], ref["weight"]),
                 db=err(grads[2], ref["bias"]), dr=err(grads[3], ref["residual"]))
    checks.append(check)
    print(check, flush=True)

with open(f"{out}/triton_gpu.json", "w") as f:
    json.dump(dict(device="cpu (dry run)" if DRY else torch.cuda.get_device_name(0),
                   copy_bandwidth_gbs=bandwidth / 1e9, rows=rows, checks=checks), f, indent=1)
csv_file.close()
EOF
}

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  step_micro
else
  unset TRITON_INTERPRET
  for step in ${GPU_CHECK_STEPS:-env tests micro bench}; do "step_$step"; done
fi
echo "results in $OUT"
