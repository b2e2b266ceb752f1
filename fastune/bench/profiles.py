"""Hardware profiles: memory, peak FLOP/s and bandwidth of a device, with the source of each.

One YAML per device in ``profiles/`` (installed as ``fastune.profiles``)::

    name: NVIDIA GeForce RTX 4090
    kind: cuda
    memory_gib:       {value: 24, source: <datasheet>}
    peak_bf16_flops:  {value: 165.2e12, source: ...}    # dense, no 2:4 sparsity
    peak_fp32_flops:  {value: 82.6e12, source: ...}
    memory_bandwidth: {value: 1008.0e9, source: ...}    # bytes/s

``cpu.yaml`` holds no figures (``measured: true``): ``load_profile("cpu")`` reads the
memory size from /proc/meminfo, and ``with_measured_speed`` times matmuls and copies
(``fastune.bench.measure``) when a command needs FLOP/s. A measured figure is only as
good as the machine is quiet while it is measured.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from typing import Any, Optional

import yaml

from fastune.config.schema import did_you_mean
from fastune.errors import FastuneError

FIGURES = ("memory_gib", "peak_bf16_flops", "peak_fp32_flops", "memory_bandwidth")


class ProfileError(FastuneError):
    """An unknown profile name or a malformed profile file (one line)."""


@dataclasses.dataclass
class Profile:
    key: str  # the file name without .yaml: rtx4090, cpu
    name: str
    kind: str  # "cuda" or "cpu"
    memory_gib: Optional[float] = None
    peak_bf16_flops: Optional[float] = None
    peak_fp32_flops: Optional[float] = None
    memory_bandwidth: Optional[float] = None  # bytes per second
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    bf16: bool = True  # False: the card has no bf16 (T4, RTX 20): training runs fp16 or fp32

    def peak_flops(self, dtype: str) -> Optional[float]:
        return self.peak_bf16_flops if dtype in ("bf16", "bfloat16") else self.peak_fp32_flops

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def profile_names() -> list[str]:
    folder = importlib.resources.files("fastune.profiles")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_profile(key: str) -> Profile:
    """The profile ``key`` (``rtx4090``, ``h100_sxm``, ``cpu``, ...)."""
    names = profile_names()
    if key not in names:
        raise ProfileError(f"--profile: no profile named {key!r}{did_you_mean(key, names)}; "
                           f"known: {', '.join(names)}")
    file = importlib.resources.files("fastune.profiles") / f"{key}.yaml"
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ProfileError(f"profiles/{key}.yaml: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or "name" not in data or data.get("kind") not in ("cuda", "cpu"):
        raise ProfileError(f"profiles/{key}.yaml: needs `name` and `kind: cuda | cpu`")
    profile = Profile(key=key, name=data["name"], kind=data["kind"], bf16=bool(data.get("bf16", True)))
    if data.get("measured"):
        profile.memory_gib = _cpu_memory_gib()
        profile.sources["memory_gib"] = "MemTotal in /proc/meminfo, read at run time"
        return profile
    for figure in FIGURES:
        entry = data.get(figure)
        if not isinstance(entry, dict) or "value" not in entry or not entry.get("source"):
            raise ProfileError(f"profiles/{key}.yaml: `{figure}` needs a `value` and a `source`")
        value = entry["value"]
        if value is not None and not isinstance(value, (int, float)):
            raise ProfileError(f"profiles/{key}.yaml: `{figure}.value` must be a number or null, got {value!r}")
        setattr(profile, figure, None if value is None else float(value))
        profile.sources[figure] = entry["source"]
    return profile


def _cpu_memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3


def with_measured_speed(profile: Profile, dtype: str = "bf16") -> Profile:
    """A CPU profile with its peak FLOP/s in ``dtype`` (bf16 or fp32) and its memory
    bandwidth measured now; GPU profiles as they are."""
    if profile.kind != "cpu":
        return profile
    from fastune.bench.measure import copy_bandwidth, matmul_flops

    measured = dataclasses.replace(profile, sources=dict(profile.sources))
    key = "peak_bf16_flops" if dtype in ("bf16", "bfloat16") else "peak_fp32_flops"
    setattr(measured, key, matmul_flops(dtype))
    measured.sources[key] = "measured: median of 2048^3 matmuls, all threads"
    measured.memory_bandwidth = copy_bandwidth()
    measured.sources["memory_bandwidth"] = "measured: median of 64 MiB tensor copies (read + write)"
    return measured
