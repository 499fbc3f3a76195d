"""Peak memory of one call: in a fresh Python process on the CPU, from the allocator on CUDA."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch


def peak_cuda_mib(fn: Callable[[], Any], device: torch.device | str) -> float:
    """Peak extra CUDA memory (MiB) that one call of ``fn`` allocated beyond what was held before."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


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
