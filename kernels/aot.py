"""Ahead-of-time compile of every Triton kernel for real GPUs, on a machine without one.

Each kernel is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
cc, 32))`` for sm_75 (T4), sm_80, sm_86, sm_89, sm_90 and sm_120 (RTX 50 series), with
the block sizes, num_warps and dtypes its host function really uses. (Every kernel
compiles for sm_75 in bf16 as well: Triton emulates the conversions there, and no kernel
uses a bf16 ``tl.dot``, which sm_75 lacks; none needs a fallback on a T4.) Then ``ptxas -v`` on the generated PTX reports
registers and spills, and the compiled metadata reports shared memory. This catches
what the interpreter cannot: non-power-of-2 blocks, unsupported ops, shared-memory
overflow and register spills.

Run it with TRITON_INTERPRET unset (under the interpreter ``@triton.jit`` gives
objects that cannot be compiled):

    python -m fastune.kernels.aot            # table
    python -m fastune.kernels.aot --json     # one JSON record per (kernel, arch)

How to add a kernel: in its op file (``kernels/<op>.py``) define

    def aot_specs() -> list[dict]:
        return [dict(
            name="rms_norm_fwd h=4096 bf16",        # a label for the table
            kernel=_rms_norm_fwd_kernel,              # the @triton.jit function
            signature={"X": "*bf16", "n_cols": "i32", "BLOCK": "constexpr", ...},
            constexprs={"BLOCK": 4096, ...},          # values of the constexpr params
            num_warps=8,
            multiple_of_16=["n_cols", "stride_x"],    # optional, see below
        ), ...]                                       # optional too: num_stages

with every parameter in ``signature`` ("*fp32", "*bf16", "i32", "i64", "fp32",
"constexpr"), computed from the same helper the host function uses to pick block
sizes and warps, at representative shapes (hidden 2048/4096, vocab 128256, rank 16).
Every module of this package that defines ``aot_specs`` is collected; nothing here
needs editing. Pointer arguments are compiled as 16-byte aligned, and the integer
arguments named in ``multiple_of_16`` as multiples of 16: that is how Triton's launcher
specializes them when the values at run time are (sizes like 2048, 4096, 128256 are),
and it decides whether loads vectorize, so leaving it out measures a slower kernel.
``spec_key`` and ``launch_key`` state both specializations in one form, so a test can
check that a spec compiles the variant real launches get.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import inspect
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from typing import Any

ARCHS = (75, 80, 86, 89, 90, 120)
# Largest dynamic shared memory one block may use, in KiB (CUDA occupancy tables).
SHARED_LIMIT_KIB = {75: 64, 80: 163, 86: 99, 89: 99, 90: 227, 120: 99}


def spec_modules() -> list[str]:
    """Names of the kernel modules of this package (those that may define aot_specs)."""
    import fastune.kernels as pkg

    skip = {"aot", "dispatch"}
    return sorted(f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)
                  if m.name not in skip and not m.name.startswith("_"))


def collect_specs() -> list[tuple[str, int, str]]:
    """(module, index, name) of every spec, so workers can re-import what they compile."""
    found = []
    for mod_name in spec_modules():
        module = importlib.import_module(mod_name)
        for i, spec in enumerate(getattr(module, "aot_specs", lambda: [])()):
            found.append((mod_name, i, spec["name"]))
    return found


def _load_spec(mod_name: str, index: int) -> dict[str, Any]:
    return importlib.import_module(mod_name).aot_specs()[index]


def _ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spill bytes, from ``ptxas -v`` on the PTX Triton generated
    (the same ptxas and flags Triton uses for the cubin, whose log it discards)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", src + ".o"]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr

    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else -1

    return dict(
        regs=grab(r"Used (\d+) registers"),
        spill_stores=grab(r"(\d+) bytes spill stores"),
        spill_loads=grab(r"(\d+) bytes spill loads"),
        stack=grab(r"(\d+) bytes stack frame"),
    )


def _params(kernel) -> list[tuple[str, bool]]:
    """(name, is_constexpr) of a @triton.jit kernel's parameters (also interpreted)."""
    fn = getattr(kernel, "fn", kernel)
    return [(name, "constexpr" in str(p.annotation))
            for name, p in inspect.signature(fn).parameters.items()]


def spec_key(spec: dict[str, Any]) -> tuple:
    """The specialization a spec compiles: per parameter (type, "D" for divisible by 16 /
    "" / None for floats) or ("constexpr", value), then num_warps. Compare with
    ``launch_key``."""
    multiple_of_16 = set(spec.get("multiple_of_16", ()))
    key = []
    for name, is_constexpr in _params(spec["kernel"]):
        ty = spec["signature"][name]
        if is_constexpr:
            key.append(("constexpr", spec["constexprs"][name]))
        elif ty.startswith("*") or name in multiple_of_16:
            key.append((ty, "D"))
        else:
            key.append((ty, None if ty.startswith(("fp", "bf")) else ""))
    return (*key, ("num_warps", spec["num_warps"]))


def launch_key(kernel, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """The specialization Triton's launcher gives a real launch ``kernel[grid](*args,
    **kwargs)``: its own rule (``native_specialize_impl``: pointers and integers divisible
    by 16 get "D", an integer 1 becomes a constant). Computed without launching, so the
    test can record launches under the interpreter, which specializes nothing."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    params = _params(kernel)
    values = dict(zip((name for name, _ in params), args))
    values.update((k, v) for k, v in kwargs.items() if k in values or k in dict(params))
    key = []
    for name, is_constexpr in params:
        value = values[name]
        if is_constexpr:
            key.append(("constexpr", value))
        else:
            key.append(tuple(native_specialize_impl(BaseBackend, value, False, True, True)))
    return (*key, ("num_warps", kwargs.get("num_warps", 4)))


def compile_one(mod_name: str, index: int, arch: int) -> dict[str, Any]:
    """Compile one spec for one arch; a record for the report (``error`` set on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = _load_spec(mod_name, index)
    record: dict[str, Any] = dict(
        name=spec["name"], module=mod_name, kernel=spec["kernel"].__name__, arch=arch,
        num_warps=spec["num_warps"], constexprs={k: str(v) for k, v in spec["constexprs"].items()},
        shared=None, shared_limit=SHARED_LIMIT_KIB[arch] * 1024,
        regs=None, spill_stores=None, spill_loads=None, stack=None, error=None,
    )
    try:
        multiple_of_16 = set(spec.get("multiple_of_16", ()))
        aligned = {(spec["kernel"].arg_names.index(arg),): [["tt.divisibility", 16]]
                   for arg, ty in spec["signature"].items()
                   if ty.startswith("*") or arg in multiple_of_16}
        src = ASTSource(fn=spec["kernel"], signature=spec["signature"],
                        constexprs=spec["constexprs"], attrs=aligned)
        options = {"num_warps": spec["num_warps"]}
        if "num_stages" in spec:
            options["num_stages"] = spec["num_stages"]
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        record["shared"] = compiled.metadata.shared
        record.update(_ptxas_usage(compiled.asm["ptx"], arch))
    except Exception as e:  # reported per kernel; the caller decides what fails
        record["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return record


def problems(record: dict[str, Any]) -> list[str]:
    """What is wrong with a compiled kernel: a compile error, spills, or too much shared memory."""
    if record["error"]:
        return [record["error"]]
    out = []
    if record["spill_stores"] != 0 or record["spill_loads"] != 0:
        out.append(f"spills {record['spill_stores']} B stores / {record['spill_loads']} B loads")
    if record["shared"] > record["shared_limit"]:
        out.append(f"shared memory {record['shared']} B > {record['shared_limit']} B")
    if record["regs"] < 0:
        out.append("could not read the ptxas register report")
    return out


def compile_all(archs=ARCHS, only: str = "", workers: int = 0) -> list[dict[str, Any]]:
    """Compile every spec for every arch, in parallel processes (compiles are CPU-bound)."""
    jobs = [(m, i, arch) for m, i, name in collect_specs() if only in name for arch in archs]
    workers = workers or min(len(jobs), os.cpu_count() or 1) or 1
    # spawn, not fork: forking a process that has imported torch can deadlock on its locks.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(compile_one, *zip(*jobs))) if jobs else []


def format_table(records: list[dict[str, Any]]) -> str:
    header = f"{'kernel':44} {'arch':>5} {'warps':>5} {'regs':>5} {'spill':>6} {'shared':>8} {'limit':>7}  status"
    lines = [header, "-" * len(header)]
    for r in records:
        status = "; ".join(problems(r)) or "ok"
        spill = "-" if r["spill_stores"] is None else str(r["spill_stores"] + r["spill_loads"])
        lines.append(
            f"{r['name'][:44]:44} {'sm_' + str(r['arch']):>5} {r['num_warps']:>5} "
            f"{r['regs'] if r['regs'] is not None else '-':>5} {spill:>6} "
            f"{r['shared'] if r['shared'] is not None else '-':>8} {r['shared_limit']:>7}  {status}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)),
                        help="comma-separated compute capabilities (default: %(default)s)")
    parser.add_argument("--only", default="", help="compile only specs whose name contains this")
    parser.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot: unset TRITON_INTERPRET; interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    records = compile_all(tuple(int(a) for a in args.arch.split(",")), args.only, args.workers)
    print(json.dumps(records, indent=1) if args.json else format_table(records))
    return 1 if any(problems(r) for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
