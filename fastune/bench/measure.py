"""Measuring primitives shared by ``fastune bench`` and the pytest-benchmark suites.

- Timing: ``Timer`` (median of timed calls after warm-up, device synchronized).
- Memory of one step: on CUDA the allocator's peak over what was allocated before;
  on CPU the peak resident set size over the RSS before (``PeakMemory``). For the
  CPU figure to mean "what this step added", glibc is told to unmap freed blocks at
  once (``release_freed_memory``) and the kernel's peak-RSS mark is reset.
- The CPU's peak: ``matmul_flops`` and ``copy_bandwidth``.
- Children: ``run_child`` runs one configuration in a fresh process and reads the
  JSON line it prints last.
"""

from __future__ import annotations

import gc
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

MIB = 1024**2


def synchronize(device: torch.device | str = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds one call of ``fn`` takes, the device synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_ms(fn: Callable[[], object], warmup: int, steps: int, device: torch.device | str = "cpu") -> float:
    """Median milliseconds of ``steps`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return 1e3 * statistics.median(time_call(fn, device) for _ in range(steps))


# ----------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def release_freed_memory() -> None:
    """Make RSS follow live memory: glibc mmaps every block >= 64 KiB (so a free unmaps
    it at once, with no dynamic threshold), and the heap's free space goes back to the OS."""
    from fastune.training.host_memory import M_MMAP_THRESHOLD, glibc

    gc.collect()
    libc = glibc()
    if libc is not None:  # elsewhere the peak also counts memory the allocator keeps
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        libc.malloc_trim(0)


def peak_rss_mib() -> float:
    """Peak resident set size of this process since start (or the last reset), MiB."""
    return _status_kib("VmHWM") / 1024


class PeakMemory:
    """Peak memory a region adds: ``with PeakMemory(device) as m: step()``, then ``m.mib``.

    CUDA: ``max_memory_allocated`` during the region minus what was allocated before.
    CPU: VmHWM after the region minus VmRSS before, after freed memory was returned and
    the peak mark reset (``/proc/self/clear_refs``).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.mib: Optional[float] = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            release_freed_memory()
            self._before = _status_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # reset the VmHWM peak mark
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024
        self.mib = (peak - self._before) / MIB


# ----------------------------------------------------------------------------- CPU peak


def matmul_flops(dtype: str = "bf16", n: int = 2048, warmup: int = 2, steps: int = 7) -> float:
    """FLOP/s of an n x n @ n x n matmul on this CPU (all threads): 2 n^3 / median time."""
    torch_dtype = torch.bfloat16 if dtype in ("bf16", "bfloat16") else torch.float32
    a = torch.randn(n, n).to(torch_dtype)
    b = torch.randn(n, n).to(torch_dtype)
    return 2 * n**3 / (median_ms(lambda: a @ b, warmup, steps) / 1e3)


def copy_bandwidth(mib: int = 64, warmup: int = 2, steps: int = 7) -> float:
    """Bytes/s of copying a ``mib`` MiB tensor into another (each byte read and written)."""
    src = torch.ones(mib * MIB, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (median_ms(lambda: dst.copy_(src), warmup, steps) / 1e3)


# ----------------------------------------------------------------------------- children


class ChildError(RuntimeError):
    pass


def run_child(cmd: Sequence[str], timeout: Optional[float] = None) -> dict:
    """Run ``cmd`` (a fresh Python process) and return the JSON object on the last line
    of its stdout; its stderr tail is in the error when it fails."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ChildError(f"{' '.join(cmd[:6])}... failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise ChildError(f"{' '.join(cmd[:6])}... printed nothing:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def python_module_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
