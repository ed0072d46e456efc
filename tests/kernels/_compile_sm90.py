"""Compile the Triton GN kernels for an H100 / H200 (sm_90) without a GPU, as the real launches would.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but not that they compile: this script
runs groupnorm.kernels.triton's host code (plans for 132 SMs) on CPU tensors with every kernel launch replaced
by an ahead-of-time compile (triton.compile for GPUTarget("cuda", 90, 32)) with the arguments the launch
would get, specialized the way Triton's JIT does (ints equal to 1 become constants, multiples of 16 and
tensor pointers get the divisibility hint). It prints one JSON line per compiled kernel: name, warps,
registers, spill stack, vector widths of the global loads.

Run it in a process without TRITON_INTERPRET: `python tests/kernels/_compile_sm90.py [case ...]`.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the package, however the script is started

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from groupnorm.kernels import triton as gt  # noqa: E402

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _signature(fn, args, kwargs):
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = args[i] if i < len(args) else kwargs[name]
        if fn.params[i].is_constexpr:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = _PTR[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int) and v == 1:
            sig[name], consts[name] = "constexpr", 1
        elif isinstance(v, int):
            sig[name] = "i64" if abs(v) >= 2**31 else "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    return sig, consts, attrs


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"regs": int(m.group(1)), "stack": int(m.group(2))} if m else {}


class _Compile:
    """Stands in for a JIT kernel: kernel[grid](*args) compiles instead of launching."""

    seen: set = set()

    def __init__(self, fn, label):
        self.fn, self.label = fn, label
        self.__name__ = fn.__name__

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            warps = kwargs.pop("num_warps", 4)
            sig, consts, attrs = _signature(self.fn, args, kwargs)
            key = (self.fn.__name__, repr(sig), repr(consts), repr(attrs), warps)
            if key in self.seen:
                return None
            self.seen.add(key)
            k = triton.compile(ASTSource(self.fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps})
            loads = sorted(set(re.findall(r"ld\.global(?:\.\w+)*?\.(v\d)\.", k.asm["ptx"])))
            print(json.dumps({"case": self.label[0], "kernel": self.fn.__name__, "warps": warps,
                              "vector_loads": loads, **_resources(k.asm["cubin"])}), flush=True)
            return None
        return launch


CASES = {  # name: (shape, G, layout, dtype, activation, residual); plans as on 132 SMs
    "r50_b2_cl_fp32": ((2, 256, 56, 56), 32, "cl", torch.float32, None, False),                 # split
    "r50_b32_cl_bf16_silu_res": ((32, 256, 56, 56), 32, "cl", torch.bfloat16, "silu", True),    # loop
    "r50s4_b32_cl_bf16_relu_res": ((32, 2048, 7, 7), 32, "cl", torch.bfloat16, "relu", True),   # single
    "unet_b2_nchw_fp16_gelu_res": ((2, 320, 64, 64), 32, "nchw", torch.float16, "gelu", True),  # split
    "ln_nc_fp64_relu": ((8, 64), 1, "nchw", torch.float64, "relu", False),  # without weight and bias
}


def main(names):
    label = [None]
    for name in dir(gt):
        if name.endswith("_kernel"):
            setattr(gt, name, _Compile(getattr(gt, name), label))
    gt._sm_count = lambda device: 132
    gt._INTERPRET = False
    for name in names or CASES:
        shape, g, layout, dtype, act, res = CASES[name]
        label[0] = name
        fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
        x = torch.empty(shape).to(dtype).contiguous(memory_format=fmt)
        w, b = (None, None) if name.startswith("ln") else (torch.ones(shape[1]), torch.zeros(shape[1]))
        r = torch.empty(shape).to(dtype).contiguous(memory_format=fmt) if res else None
        y, stats = gt._forward_impl(x, w, b, r, g, 1e-5, gt._ACT_CODES[act])
        gt._backward_impl(x, x, w, b, r, stats, g, gt._ACT_CODES[act], True, w is not None, b is not None,
                          res and act is not None)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run without TRITON_INTERPRET=1: this compiles the real kernels")
    main(sys.argv[1:])
