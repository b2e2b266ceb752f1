"""Every Triton kernel compiles ahead of time for sm_75, sm_80, sm_86, sm_89, sm_90 and sm_120 at the
block sizes its host function uses, with no register spills and shared memory within
each arch's per-block limit.

The compiles run in a subprocess with TRITON_INTERPRET unset (tests/conftest.py sets
it, and interpreted kernels cannot be compiled). Kernels declare their launches with
``aot_specs()`` in their own file; see kernels/aot.py.
"""

import importlib
import json
import os
import subprocess
import sys

import pytest
from triton.runtime.jit import KernelInterface

from fastune.kernels import aot

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def records():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastune.kernels.aot", "--json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip(), f"aot harness printed nothing:\n{proc.stderr[-3000:]}"
    found = json.loads(proc.stdout)
    print("\n" + aot.format_table(found))
    return found


def test_no_spills_or_shared_memory_overflow(records):
    bad = {f"{r['name']} sm_{r['arch']}": aot.problems(r) for r in records if aot.problems(r)}
    assert not bad, "\n".join(f"{k}: {'; '.join(v)}" for k, v in bad.items())


def test_every_spec_compiled_for_every_arch(records):
    per_spec: dict[str, set] = {}
    for r in records:
        per_spec.setdefault(r["name"], set()).add(r["arch"])
    assert per_spec, "no kernel specs found"
    missing = {name: sorted(set(aot.ARCHS) - archs) for name, archs in per_spec.items()
               if set(aot.ARCHS) - archs}
    assert not missing, f"not compiled for some archs: {missing}"


def test_every_launched_kernel_has_a_spec(records):
    """A kernel is launched from its host function when its name ends in ``_kernel``
    (helpers such as ``interpreter.cast`` are inlined into kernels instead)."""
    compiled = {(r["module"], r["kernel"]) for r in records}
    launched = set()
    for mod_name in aot.spec_modules():
        module = importlib.import_module(mod_name)
        for attr, value in vars(module).items():
            if isinstance(value, KernelInterface) and attr.endswith("_kernel"):
                launched.add((mod_name, attr))
    assert launched - compiled == set(), f"kernels with no AOT spec: {sorted(launched - compiled)}"
