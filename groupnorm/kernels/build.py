"""Builds the C++ CPU op (groupnorm/csrc/group_norm_cpu.cpp) against the installed torch:

    python -m groupnorm.kernels.build [--force]

The library goes to ``groupnorm/kernels/_build/torch-<torch version>/groupnorm_cpu.so`` (one folder
per torch version, so that one .venv can switch torch versions between scripts/setup.sh flavours),
with a ``stamp.json`` of what it was built from: the torch version, the source's SHA-256 and the
vector instruction set. A build whose stamp matches is up to date and is skipped. Prints one line;
exit status 0 when the op is built (or up to date), 1 when it could not be built.

Vectorization: ATen's ``at::vec::Vectorized`` picks its width from the CPU_CAPABILITY macros the
code is compiled with, so they are set from what this machine's CPU supports (the build runs on the
machine that uses it; the loader refuses a library built for an instruction set the CPU lacks):
AVX512 (f, bw, vl, dq), else AVX2 + FMA + F16C, else ATen's portable default.
``GROUPNORM_CPU_CAPABILITY=AVX512|AVX2|DEFAULT`` overrides the choice.

Threads: compiled with OpenMP (Linux), so that ``at::parallel_for`` runs in torch's own OpenMP
pool (the libgomp.so.1 torch loaded) rather than on the calling thread alone.

Nothing here runs at import of the package: the loader (``groupnorm.kernels.cpu``) only loads a
built library, it never compiles.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT.parent / "csrc" / "group_norm_cpu.cpp"
NAME = "groupnorm_cpu"
REBUILD = "bash scripts/setup.sh (or python -m groupnorm.kernels.build)"

# The CPU flags (/proc/cpuinfo) each capability needs, and the compiler flags that enable it.
CAPABILITIES = {
    "AVX512": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"),
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]),
    # (F16C: ATen's 256-bit vectors convert Half with _cvtss_sh; without it the AVX2 build fails)
    "AVX2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
    "DEFAULT": ((), []),
}


# at::parallel_for runs its body in torch's OpenMP thread pool only in code compiled with OpenMP
# (ATen/ParallelOpenMP.h is `#ifdef _OPENMP`); without it every loop runs on the calling thread.
# The library then needs libgomp.so.1, the one torch loaded already (torch/lib/libgomp.so.1, same
# soname): one pool, sized by torch.set_num_threads.
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []


def build_dir(torch_version: str) -> Path:
    """The folder of the build for one torch version."""
    return ROOT / "_build" / f"torch-{torch_version}"


def library_path(torch_version: str) -> Path:
    return build_dir(torch_version) / f"{NAME}.so"


def source_hash() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_capability(flags: set[str]) -> str:
    forced = os.environ.get("GROUPNORM_CPU_CAPABILITY")
    if forced:
        if forced not in CAPABILITIES:
            raise ValueError(f"GROUPNORM_CPU_CAPABILITY must be one of {sorted(CAPABILITIES)}, "
                             f"got {forced!r}")
        return forced
    for name in ("AVX512", "AVX2"):
        if set(CAPABILITIES[name][0]) <= flags:
            return name
    return "DEFAULT"


def wanted_stamp(torch_version: str, capability: str) -> dict:
    return {"torch": torch_version, "source_sha256": source_hash(), "capability": capability,
            "openmp": bool(OPENMP)}


def stale_reason(stamp: dict) -> str | None:
    """Why a library built as ``stamp`` says is not what this source and build make (None: it is).
    The loader asks this too, so a library from an older build is never taken as current."""
    if SOURCE.is_file() and stamp.get("source_sha256") != source_hash():
        return "built from an older source"
    if stamp.get("openmp", False) != bool(OPENMP):
        return "built without OpenMP (it would run on one thread)" if OPENMP else "built with OpenMP"
    return None


def read_stamp(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "stamp.json").read_text())
    except (OSError, ValueError):
        return None


def build(force: bool = False) -> tuple[bool, str]:
    """Builds the op if it is not up to date. Returns (ok, one line saying what happened)."""
    import logging

    import torch
    # (its import warns that no CUDA runtime is found: irrelevant to a CPU op)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    version = torch.__version__
    capability = choose_capability(cpu_flags())
    folder = build_dir(version)
    lib = library_path(version)
    stamp = wanted_stamp(version, capability)
    if not force and lib.is_file() and read_stamp(folder) == stamp:
        return True, f"groupnorm: CPU op up to date for torch {version} ({capability}): {lib}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stamp.json").unlink(missing_ok=True)
    # ninja decides by timestamps: an object newer than a source edited during an earlier build
    # would be taken as up to date, so the outputs go first. The stamp is the source as read now.
    for old in folder.glob("*.o"):
        old.unlink()
    lib.unlink(missing_ok=True)
    # cpp_extension runs `ninja` from PATH: the one pip installed beside this Python comes first.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    cflags = ["-O3", "-DNDEBUG", "-fvisibility-inlines-hidden",
              f"-DCPU_CAPABILITY={capability}"] + CAPABILITIES[capability][1]
    if capability != "DEFAULT":
        cflags.append(f"-DCPU_CAPABILITY_{capability}")
    cflags += OPENMP
    ldflags = list(OPENMP)
    start = time.perf_counter()
    try:
        cpp_extension.load(name=NAME, sources=[str(SOURCE)], extra_cflags=cflags,
                           extra_ldflags=ldflags, build_directory=str(folder),
                           is_python_module=False, verbose=False)
        if not lib.is_file():
            raise RuntimeError(f"the build gave no {lib.name}")
    except Exception as exc:  # a compiler error, no compiler, no ninja: one line, setup goes on
        reason = " ".join(str(exc).split())[-300:]
        return False, (f"groupnorm: could not build the CPU op for torch {version} ({reason}); "
                       f"Group Norm falls back to the 'native' backend. Rebuild: {REBUILD}")
    (folder / "stamp.json").write_text(json.dumps(stamp, indent=1) + "\n")
    return True, (f"groupnorm: built the CPU op for torch {version} ({capability}) in "
                  f"{time.perf_counter() - start:.0f} s: {lib}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    ok, line = build(force=args.force)
    print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
