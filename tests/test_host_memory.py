"""host_memory: keep (fastune.training.host_memory): glibc keeps a freed block in the heap,
so allocating it again costs no page faults. Each check runs in its own process, since
mallopt is global. (The effect on a training step is a benchmark figure: issue 18's note.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastune.training import host_memory

SCRIPT = """
import ctypes, ctypes.util, resource, sys
from fastune.training.host_memory import keep_freed_host_memory
print(keep_freed_host_memory() if sys.argv[1] == "keep" else None)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
size = 64 << 20

def touched():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    return block

libc.free(touched())  # the first one faults in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    libc.free(touched())  # freed at once, as a step's activations are
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 5 * (64 << 20) // os.sysconf("SC_PAGE_SIZE")


def _faults(mode: str, **env) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in host_memory._USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(host_memory.glibc() is None, reason="glibc's mallopt only")
def test_kept_memory_is_reused_without_page_faults():
    assert _faults("release")[1] > 0.9 * PAGES  # glibc's default: every allocation faults in anew
    kept, faults = _faults("keep")
    assert kept == "True" and faults < 0.02 * PAGES


def test_the_user_s_malloc_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert host_memory.keep_freed_host_memory() is False
