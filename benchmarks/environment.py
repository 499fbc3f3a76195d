"""Where a result was measured: device, CPU, caches, threads, library versions, commit, load."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@functools.lru_cache(maxsize=None)
def cpu_caches() -> dict[str, int]:
    """Per-core cache sizes in bytes by level name (``L1d``, ``L2``, ``L3``...) from sysfs."""
    caches: dict[str, int] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        value = int(size.rstrip("KMG")) * scale
        caches[f"L{level}" + ("d" if kind == "Data" else "")] = value
    return caches


def last_level_cache_bytes(device: torch.device | str = "cpu") -> int:
    """The largest cache in front of the device's memory (CPU L3, GPU L2); 0 when unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return int(getattr(props, "L2_cache_size", 0))
    return max(cpu_caches().values(), default=0)


def git_commit() -> tuple[Optional[str], Optional[bool]]:
    """(short commit hash, whether tracked files differ from it), or Nones outside a checkout
    (there ``NGCUDA_GIT_COMMIT`` names the commit, when set)."""
    def run(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = run("rev-parse", "--short", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    if not commit:  # a copy of the tree without .git (the device machine): the commit passed in
        return os.environ.get("NGCUDA_GIT_COMMIT") or None, None
    return commit.strip() or None, None if status is None else bool(status.strip())


def load_average() -> Optional[list[float]]:
    """1, 5 and 15 minute load averages: how busy the machine was (other jobs skew timings)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The machine and software a result was measured on."""
    import ngcuda

    dev = torch.device(device)
    commit, dirty = git_commit()
    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_caches_bytes": cpu_caches(),
        "last_level_cache_bytes": last_level_cache_bytes(dev),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ngcuda_build": ngcuda.build_info(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": dirty,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_start": load_average(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env["gpu_memory_bytes"] = int(props.total_memory)
        env["gpu_sm_count"] = int(props.multi_processor_count)
        env["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return env


def device_slug(device: torch.device | str) -> str:
    """A file-name-safe name of the device: ``cpu``, or the GPU's name in lower case."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(dev).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")
