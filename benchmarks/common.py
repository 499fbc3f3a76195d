"""Timing, environment and JSON helpers shared by every benchmark."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

RESULTS = Path(__file__).parent / "results"


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], device: torch.device | str = "cpu", warmup: int = 2,
                repeat: int = 7, min_seconds: float = 0.0) -> float:
    """Median wall seconds of ``fn()`` after ``warmup`` calls, synchronising the device."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start_all < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeat:
            break
    return statistics.median(times)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where a result was measured: device, CPU model, threads, torch, CUDA and git commit."""
    import ngcuda

    dev = torch.device(device)
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ngcuda_build": ngcuda.build_info(),
        "python": sys.version.split()[0],
        "git_commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: Path | str, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Prints rows as an aligned text table."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def peak_rss_in_child(code: str, timeout: float = 600.0) -> float:
    """Peak extra resident memory (MiB) of running ``code`` in a fresh Python process.

    The child runs everything before the line ``# measure`` as set-up, then reports how far its
    peak RSS rose while running the rest. A separate process keeps earlier peaks out of the number.
    """
    setup, _, body = code.partition("# measure")
    # Linux resets the peak-RSS mark (VmHWM) on writing 5 to clear_refs, so the peak after the
    # body, less the RSS before it, is what the body alone added.
    script = (
        "import ctypes, re\n" + setup +
        "\nctypes.CDLL('libc.so.6').malloc_trim(0)"
        "\nopen('/proc/self/clear_refs', 'w').write('5')"
        "\n_kib = lambda key: int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
        "\n_base = _kib('VmRSS')\n" + body +
        "\nprint((_kib('VmHWM') - _base) / 1024.0)\n"
    )
    env = dict(os.environ)
    # A fixed mmap threshold makes freed large buffers go back to the OS, so the set-up's
    # temporaries cannot hide the measured code's peak behind an old high-water mark.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])
