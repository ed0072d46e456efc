"""Benchmark: training throughput (images/s) of a ResNet with BN, torch's GN and our GN, fused or not.

    python benchmarks/bench_train.py [--quick] [--model resnet20] [--input 1x28x28] [--batches 8 32 128]
                                     [--groups 8] [--threads T] [--channels-last] [--json OUT]

Variants, all the same model (``groupnorm.models.build_model``) and the same SGD step
(forward, cross-entropy, backward, SGD with momentum and weight decay):

* ``bn-torch``        torch.nn.BatchNorm2d (BN over the whole batch: the fastest BN there is);
* ``bn``              groupnorm.nn.BatchNorm, as the engine trains it: statistics per worker of 8 images
                      (``bn@8``) when the batch is larger than 8;
* ``gn-native``       groupnorm's GN module on the "native" backend (torch's F.group_norm, unfused);
* ``gn-ours``         the same module on the "cpu" backend (the C++ op), each residual block's last norm
                      fused with the shortcut add and the ReLU (``models.layers.norm_add_relu``);
* ``gn-ours-unfused`` the C++ op with that fusion switched off: relu(norm(out) + shortcut).

Method: one process, one input batch per size (synthetic, like Fashion-MNIST or CIFAR shapes), every
variant warmed up, then ``--rounds`` rounds in which each variant runs ``--steps`` timed steps in turn
(interleaving spreads machine noise over all variants); images/s = batch / median step time. The data
pipeline is left out.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from groupnorm import backends  # noqa: E402
from groupnorm.models import build_model  # noqa: E402
import groupnorm.nn as gnn  # noqa: E402
from groupnorm.models import layers  # noqa: E402

VARIANTS = ("bn-torch", "bn", "gn-native", "gn-ours", "gn-ours-unfused")


def to_torch_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every groupnorm.nn.BatchNorm by a torch.nn.BatchNorm2d with the same parameters."""
    for name, child in model.named_children():
        if isinstance(child, gnn.BatchNorm):
            bn = torch.nn.BatchNorm2d(child.num_features, child.eps, child.momentum)
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            to_torch_bn(child)
    return model


def make(variant: str, args, batch: int):
    torch.manual_seed(0)
    c, h, w = args.input
    norm = "bn" if variant == "bn-torch" else f"bn@{min(8, batch)}" if variant == "bn" and batch % 8 == 0 \
        else "bn" if variant == "bn" else f"gn:{args.groups}"
    model = build_model(args.model, num_classes=10, in_channels=c, norm=norm, **args.model_args)
    if variant == "bn-torch":
        model = to_torch_bn(model)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, c, h, w).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    backend = "cpu" if variant.startswith("gn-ours") else "native"
    return model, opt, x, y, backend, variant != "gn-ours-unfused"


def step_times(model, opt, x, y, backend: str, fuse: bool, steps: int) -> list[float]:
    # (unfused: the blocks add the shortcut and apply the ReLU themselves)
    with backends.use_backend(backend), layers.residual_fusion(fuse):
        return _steps(model, opt, x, y, steps)


def _steps(model, opt, x, y, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return times


def bench(args) -> list[dict]:
    rows = []
    variants = [v for v in args.variants if v in VARIANTS]
    reason = backends.available("cpu")
    if reason is not None and any(v.startswith("gn-ours") for v in variants):
        print(f"skipping gn-ours*: {reason}", file=sys.stderr)
        variants = [v for v in variants if not v.startswith("gn-ours")]
    for batch in args.batches:
        setups = {v: make(v, args, batch) for v in variants}
        for v, s in setups.items():
            step_times(*s, steps=args.warmup)
        times = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v, s in setups.items():
                times[v] += step_times(*s, steps=args.steps)
        for v in variants:
            t = sorted(times[v])
            median = statistics.median(t)
            rows.append({"batch": batch, "variant": v, "images_per_s": batch / median, "step_ms": 1e3 * median,
                         "step_ms_p25": 1e3 * t[len(t) // 4], "step_ms_p75": 1e3 * t[3 * len(t) // 4]})
        print(f"batch {batch}: " + "  ".join(f"{r['variant']} {r['images_per_s']:.0f}" for r in rows[-len(variants):])
              + " img/s", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: images/s per batch and variant, then each GN variant's speed relative to bn-torch."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    get = {(r["batch"], r["variant"]): r["images_per_s"] for r in rows}
    ratios = [v for v in ("gn-native", "gn-ours", "gn-ours-unfused") if v in variants and "bn-torch" in variants]
    fusion = "gn-ours" in variants and "gn-ours-unfused" in variants
    cols = ([f"{v} img/s" for v in variants] + [f"{v} / bn-torch" for v in ratios]
            + (["fused / unfused"] if fusion else []))
    lines = ["| batch | " + " | ".join(cols) + " |", "|" + "---:|" * (len(cols) + 1)]
    for b in batches:
        cells = [f"{get[b, v]:.0f}" for v in variants] + [f"{get[b, v] / get[b, 'bn-torch']:.2f}" for v in ratios]
        cells += [f"{get[b, 'gn-ours'] / get[b, 'gn-ours-unfused']:.2f}"] if fusion else []
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--model-args", type=json.loads, default={}, help='JSON, e.g. \'{"width": 32}\'')
    p.add_argument("--input", default="1x28x28", help="CxHxW of the images (1x28x28 Fashion-MNIST, 3x32x32 CIFAR)")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--groups", type=int, default=8, help="G for GN (8: resnet20's 16-channel layers)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="batches 8 and 32, 2 rounds of 5 steps")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.input = tuple(int(v) for v in args.input.split("x"))
    if args.quick:
        args.batches, args.rounds, args.steps, args.warmup = [8, 32], 2, 5, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench(args)
    info = {"model": args.model, "model_args": args.model_args, "input": "x".join(map(str, args.input)),
            "groups": args.groups, "threads": torch.get_num_threads(), "channels_last": args.channels_last,
            "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
            "steps": args.steps * args.rounds}
    print(f"{args.model} {info['input']}, G={args.groups}, {info['threads']} threads, torch {torch.__version__}"
          + (", channels_last" if args.channels_last else ""))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({**info, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
