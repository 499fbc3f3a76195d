"""Clocks for the benchmarks: synchronised single calls, round-robin comparisons, input rotation.

Every timed call is bracketed by a device synchronisation (CPU: ``perf_counter``; CUDA: a pair of
CUDA events around the call, read after synchronising), so asynchronous kernels are counted in
full. Methods that are compared with each other are timed *round-robin*: each round calls every
method once, in an order that rotates from round to round, so a machine shared with other jobs
slows all of them alike instead of whichever happened to run during a burst of load.
"""
from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch

from .environment import last_level_cache_bytes

T = TypeVar("T")


def sync(device: torch.device | str) -> None:
    """Waits for every queued kernel of ``device`` (a no-op on the CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_call(fn: Callable[[], Any], device: torch.device | str) -> float:
    """Seconds of one call of ``fn``, with the device idle before and drained after."""
    dev = torch.device(device)
    sync(dev)
    if dev.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass(frozen=True)
class Timing:
    """Summary of repeated timings of one method, in seconds."""

    median_s: float
    min_s: float
    iqr_s: float
    samples: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> "Timing":
        if len(seconds) >= 4:
            q = statistics.quantiles(seconds, n=4)
            iqr = q[2] - q[0]
        else:
            iqr = max(seconds) - min(seconds)
        return cls(statistics.median(seconds), min(seconds), iqr, len(seconds))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def compare(fns: dict[str, Callable[[], Any]], device: torch.device | str, *, warmup: int = 2,
            min_repeats: int = 5, max_repeats: int = 30, min_seconds: float = 0.0
            ) -> dict[str, Timing]:
    """Median time per call of each method, timed round-robin.

    Runs ``warmup`` untimed rounds, then timed rounds until at least ``min_repeats`` rounds and
    ``min_seconds`` of wall time have passed, or ``max_repeats`` rounds: fast methods get many
    samples, slow ones ``min_repeats``.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(max_repeats):
        # Rotating the order keeps a method from always following the same neighbour (whose
        # cache or frequency state it would otherwise inherit in every round).
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name].append(time_call(fns[name], device))
        if r + 1 >= min_repeats and time.perf_counter() - start >= min_seconds:
            break
    return {name: Timing.of(s) for name, s in samples.items()}


def copies_to_exceed_cache(bytes_per_set: int, device: torch.device | str, *, factor: float = 2.0,
                           max_copies: int = 64, max_bytes: int = 512 << 20) -> int:
    """How many copies of an input set to rotate through so that consecutive calls of one
    method find their inputs evicted from the last-level cache.

    ``factor`` times the cache size is the target working set, capped at ``max_copies`` copies
    and ``max_bytes`` in all (small inputs then stay partly cached; the row records it).
    """
    cache = last_level_cache_bytes(device)
    if not cache or bytes_per_set <= 0:
        return 1
    want = -(-int(factor * cache) // bytes_per_set)  # ceil
    by_memory = max(1, max_bytes // bytes_per_set)
    return int(max(1, min(want, max_copies, by_memory)))


def rotation(first: T, copies: int) -> list[T]:
    """``copies`` independent input sets: ``first`` and deep clones of its tensors."""
    return [first] + [_clone(first) for _ in range(copies - 1)]


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


def cycling(fn: Callable[[T], Any], sets: Sequence[T], offset: int = 0) -> Callable[[], Any]:
    """A no-argument callable that applies ``fn`` to the next input set on every call.

    Methods compared round-robin over the same sets should start at different ``offset``s
    (see :func:`staggered`): otherwise each would find the set its predecessor just touched
    still in the cache.
    """
    it = itertools.cycle(list(sets[offset % len(sets):]) + list(sets[:offset % len(sets)]))
    return lambda: fn(next(it))


def staggered(fns: dict[str, Callable[[T], Any]], sets: Sequence[T]) -> dict[str, Callable[[], Any]]:
    """:func:`cycling` for several methods over one rotation, spread evenly around it."""
    k = len(fns)
    return {name: cycling(fn, sets, i * len(sets) // k) for i, (name, fn) in enumerate(fns.items())}


def options(quick: bool, slow: bool = False) -> dict[str, Any]:
    """Repeat counts for :func:`compare`: a few rounds in --quick runs, fewer for slow calls
    (those estimated at over a second), otherwise at least 5 rounds and half a second."""
    if quick:
        return {"warmup": 1, "min_repeats": 3, "max_repeats": 3}
    if slow:
        return {"warmup": 1, "min_repeats": 3, "max_repeats": 5}
    return {"warmup": 2, "min_repeats": 5, "max_repeats": 30, "min_seconds": 0.5}


def nbytes(obj: Any) -> int:
    """Bytes held by the tensors in a (nested) input set."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(nbytes(o) for o in obj.values())
    return 0
