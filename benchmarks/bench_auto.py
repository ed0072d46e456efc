"""Benchmark behind the "auto" backend's CPU rule: where do our kernels beat the native path?

    python benchmarks/bench_auto.py [--threads 2] [--json OUT]

"auto" chooses per call between the "cpu" backend (our Numba kernels through the custom op) and the
"native" backend (torch's ops, made accurate in every layout by a group-mean shift:
``backends.native_group_norm``). Both are timed here as a user calls them, through
``groupnorm.functional.group_norm`` under ``use_backend``, autograd included, on a ladder of sizes
(ResNet-like C and spatial sizes at batch 2, G = 32, float32), NCHW and channels_last, for four cases:
``fwd``, ``fwd+bwd``, ``fused`` (SiLU + residual) and ``fused+bwd``. Each pair is timed twice,
interleaved, on rotating inputs (medians); "cpu/native" < 1 means ours is faster. The last lines give,
per case and layout, the smallest size from which ours won at every larger size of the ladder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import groupnorm.functional as GF  # noqa: E402
from bench_kernels import Timer, median_time  # noqa: E402
from groupnorm import use_backend  # noqa: E402

G = 32
LADDER = [(2, 64, 8, 8), (2, 128, 16, 16), (2, 256, 16, 16), (2, 256, 28, 28), (2, 512, 28, 28),
          (2, 256, 56, 56), (2, 512, 56, 56), (2, 256, 112, 112)]
CASES = ("fwd", "fwd+bwd", "fused", "fused+bwd")
ITERS = (10, 200)   # timed calls per median: at least, at most (fewer for larger tensors)


def make_call(s, case):
    fused = case.startswith("fused")
    act, r = ("silu", s["r"]) if fused else (None, None)
    if not case.endswith("bwd"):
        return lambda: GF.group_norm(s["x"], G, s["w"], s["b"], activation=act, residual=r)
    x = s["x"].detach().requires_grad_()
    w = s["w"].detach().requires_grad_()
    b = s["b"].detach().requires_grad_()

    def call():
        GF.group_norm(x, G, w, b, activation=act, residual=r).backward(s["dy"])
    return call


def median_ms(backend, sets, case, iters) -> float:
    with use_backend(backend):
        return 1e3 * median_time(Timer(torch.device("cpu")), lambda s: make_call(s, case), sets,
                                 iters, 0.0, iters)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} G={G} float32")
    print(f"{'shape':18} {'layout':6} {'case':10} {'native ms':>13} {'cpu ms':>13} {'cpu/native':>10}")
    rows = []
    for shape in LADDER:
        numel = 1
        for d in shape:
            numel *= d
        iters = max(ITERS[0], min(ITERS[1], int(4e7 / numel)))
        for fmt_name, fmt in (("nchw", torch.contiguous_format), ("cl", torch.channels_last)):
            gen = torch.Generator().manual_seed(0)

            def rnd(*s):
                return torch.randn(*s, generator=gen).contiguous(memory_format=fmt) if len(s) > 1 \
                    else torch.randn(*s, generator=gen)
            sets = [dict(x=rnd(*shape) + 0.5, r=rnd(*shape), dy=rnd(*shape), w=rnd(shape[1]),
                         b=rnd(shape[1])) for _ in range(4)]
            for case in CASES:
                native = [median_ms("native", sets, case, iters)]
                cpu = [median_ms("cpu", sets, case, iters)]
                native.append(median_ms("native", sets, case, iters))
                cpu.append(median_ms("cpu", sets, case, iters))
                ratio = min(cpu) / min(native)
                rows.append(dict(shape=list(shape), numel=numel, layout=fmt_name, case=case,
                                 native_ms=native, cpu_ms=cpu, ratio=ratio))
                print(f"{'x'.join(map(str, shape)):18} {fmt_name:6} {case:10} "
                      f"{native[0]:6.2f}/{native[1]:6.2f} {cpu[0]:6.2f}/{cpu[1]:6.2f} {ratio:10.2f}")
    print("smallest size (elements) from which cpu won at every larger size of the ladder:")
    for fmt_name in ("nchw", "cl"):
        for case in CASES:
            mine = [r for r in rows if r["layout"] == fmt_name and r["case"] == case]
            from_size = None
            for r in reversed(mine):
                if r["ratio"] >= 1.0:
                    break
                from_size = r["numel"]
            print(f"  {fmt_name:5} {case:10} {from_size if from_size is not None else 'never'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
