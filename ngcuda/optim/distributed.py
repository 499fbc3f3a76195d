"""Distributed K-FAC on ``torch.distributed``: what is communicated, and who does which work.

The split follows kfac-pytorch: :mod:`.layers` captures, :mod:`.kfac` does the preconditioner
maths, this module does the communication and the work assignment. :class:`ngcuda.KFAC` calls it at
four points, each a plain SUM all-reduce or a broadcast (gloo on CPU, NCCL on GPU):

1. **Gradients** (only when the model is not wrapped in DDP, which averages them already):
   ``g ← Σ_r n_r g_r / Σ_r n_r``, weighted by each rank's example count ``n_r``, because the loss is
   a mean over the rank's own examples. Bucketed, asynchronous. With them go which layers ran
   forward on each rank (with DDP, in a tiny call of their own): a layer that ran on any rank is
   preconditioned on every rank, so that all ranks treat the same layers alike.
2. **Factors**, on factor-update steps: the local statistics are weighted and summed, so that the
   result equals the statistic of one process on the union of the data:
   ``A = Σ_r R_r A_r / Σ_r R_r`` (``R_r``: rows of the layer input on rank ``r``, since A is a row
   mean) and ``G = Σ_r n_r G_r / Σ_r n_r`` (``G_r = Σ_i ĝ_i ĝ_iᵀ / n_r``). One tiny synchronous
   all-reduce first exchanges the weights and whether each A changed; then the statistics go in
   buckets of ``bucket_mb`` as asynchronous all-reduces. An input factor that is constant on every
   rank (a fixed feature matrix) is neither recomputed nor sent.
3. **Eigendecompositions**, on inverse-update steps: the matrices are assigned to ranks by
   :func:`greedy_assign` on their ``n³`` cost, each rank solves its share in one ``batched_eigh``
   call, and the results are broadcast (``broadcast="eigenbases"``, KAISA's COMM-OPT, gradient-worker
   fraction 1). With ``broadcast="gradients"`` (KAISA's MEM-OPT, fraction 1/world) each layer has
   one owner for the whole run, only the owner keeps and computes its eigenbases, and
4. **preconditioned gradients** are broadcast from the owners every step.

Every wait is bounded by ``timeout`` seconds and a failed or timed-out collective raises
:class:`DistributedKFACError` naming the rank, the step and what it waited for, so that a rank that
crashed makes the others fail fast instead of hanging.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["BROADCASTS", "DistributedOptions", "DistributedKFACError", "LocalStatistics",
           "Communicator", "REMOTE", "greedy_assign", "make_communicator"]

BROADCASTS = ("eigenbases", "gradients")


class DistributedKFACError(RuntimeError):
    """A collective of distributed K-FAC failed or timed out (another rank probably failed)."""


@dataclass(frozen=True)
class DistributedOptions:
    """Settings of distributed K-FAC (``ngcuda.KFAC(..., distributed=DistributedOptions(...))``).

    Attributes:
        broadcast: ``"eigenbases"``: every rank gets every eigenbasis (communication on inverse
            updates only; KAISA gradient-worker fraction 1). ``"gradients"``: a layer's owner alone
            holds its eigenbases and broadcasts its preconditioned gradient every step (memory
            1/world; fraction 1/world). Fractions in between are not implemented.
        bucket_mb: size of one all-reduce bucket (MiB).
        timeout: seconds any rank waits for one collective before raising.
        average_gradients: None: average the gradients unless the model is a
            ``DistributedDataParallel`` (which has done it); True / False force it.
        group: the process group (None: the default group).
    """

    broadcast: str = "eigenbases"
    bucket_mb: float = 25.0
    timeout: float = 300.0
    average_gradients: Optional[bool] = None
    group: Any = None

    def __post_init__(self) -> None:
        if self.broadcast not in BROADCASTS:
            raise ValueError(f"broadcast must be one of {BROADCASTS}, got {self.broadcast!r}")
        if not self.bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {self.bucket_mb}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")


def greedy_assign(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each work item: longest first, each to the least-loaded rank.

    Deterministic (ties: lower item index first, then lower rank), so every rank computes the same
    assignment without communicating. The load of the busiest rank is at most 4/3 of the optimum
    (Graham's LPT bound). Ranks get no item when there are fewer items than ranks.
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    loads = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        owners[i] = r
        loads[r] += float(costs[i])
    return owners


def eigh_cost(n: int) -> float:
    """Cost model of one n×n symmetric eigendecomposition."""
    return float(n) ** 3


@dataclass
class LocalStatistics:
    """One layer's factor statistics on this rank.

    ``a``: [.., ..] local mean of ā āᵀ over ``a_weight`` input rows, or None when the input did not
    change since the last update (``recompute_a`` forms it if another rank's input did change).
    ``g``: local ``Σ ĝ ĝᵀ / n_r`` with ``g_weight = n_r`` examples.
    """

    a: Optional[Tensor]
    a_weight: float
    g: Tensor
    g_weight: float
    recompute_a: Callable[[], Tensor]


class _REMOTE:
    def __repr__(self) -> str:
        return "REMOTE"


REMOTE = _REMOTE()  # a decomposition that another rank owns (broadcast="gradients")


def _buckets(tensors: Sequence[Tensor], cap_bytes: int) -> list[list[int]]:
    """Consecutive runs of tensors of one dtype and device, each at most ``cap_bytes`` (a single
    bigger tensor gets a bucket of its own)."""
    out: list[list[int]] = []
    size = 0
    key = None
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        k = (t.dtype, t.device)
        if not out or k != key or size + nbytes > cap_bytes:
            out.append([])
            size, key = 0, k
        out[-1].append(i)
        size += nbytes
    return out


class PendingSum:
    """Asynchronous bucketed SUM all-reduce of a list of tensors; :meth:`wait` returns the sums."""

    def __init__(self, comm: "Communicator", tensors: list[Tensor], what: str) -> None:
        self.comm, self.tensors, self.what = comm, tensors, what
        cap = int(comm.options.bucket_mb * 2**20)
        self.flat: list[tuple[list[int], Tensor]] = []
        self.works: list[Any] = []
        for idx in _buckets(tensors, cap):
            flat = torch.cat([tensors[i].reshape(-1) for i in idx])
            self.flat.append((idx, flat))
            self.works.append(dist.all_reduce(flat, group=comm.group, async_op=True))

    def wait(self) -> list[Tensor]:
        self.comm._wait(self.works, self.what)
        out: list[Optional[Tensor]] = [None] * len(self.tensors)
        for idx, flat in self.flat:
            off = 0
            for i in idx:
                n = self.tensors[i].numel()
                out[i] = flat[off:off + n].view_as(self.tensors[i])
                off += n
        return out  # type: ignore[return-value]


class PendingFactors:
    """The factor all-reduce in flight; :meth:`wait` gives per layer None (no update) or
    ``(A or None, G)``, the averages over all ranks."""

    def __init__(self, plan: list[tuple[bool, bool]], pending: Optional[PendingSum]) -> None:
        self.plan, self.pending = plan, pending

    def wait(self) -> list[Optional[tuple[Optional[Tensor], Tensor]]]:
        sums = iter(self.pending.wait() if self.pending is not None else [])
        out: list[Optional[tuple[Optional[Tensor], Tensor]]] = []
        for send_a, send_g in self.plan:
            a = next(sums) if send_a else None
            out.append((a, next(sums)) if send_g else None)
        return out


class Communicator:
    """All the collectives of distributed K-FAC on one process group (world size > 1)."""

    def __init__(self, options: DistributedOptions, layer_costs: Sequence[float],
                 average_gradients: bool) -> None:
        self.options = options
        self.group = options.group
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.average_grads = average_gradients
        # broadcast="gradients": one owner per layer for the whole run, so that the owner keeps
        # the eigenbases (warm starts, fallback to the previous basis) from one update to the next.
        self.layer_owner = greedy_assign(layer_costs, self.world)
        self.step = 0
        self.calls = 0  # collectives launched (tests and overhead accounting)
        self.elements = 0  # elements all-reduced or broadcast, summed over the calls

    # -------------------------------------------------------------------------- plumbing
    def _src(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _wait(self, works: Iterable[Any], what: str) -> None:
        timeout = datetime.timedelta(seconds=self.options.timeout)
        for w in works:
            try:
                w.wait(timeout)
            except Exception as err:  # gloo/NCCL raise RuntimeError or DistBackendError
                raise DistributedKFACError(
                    f"ngcuda.KFAC (distributed): rank {self.rank}/{self.world} failed waiting for "
                    f"{what} at step {self.step} (timeout {self.options.timeout:g}s): {err}. "
                    "Another rank has probably failed or stopped calling step(); see its log."
                ) from err

    def sum_async(self, tensors: list[Tensor], what: str) -> PendingSum:
        self.calls += 1
        self.elements += sum(t.numel() for t in tensors)
        return PendingSum(self, tensors, what)

    def sum_now(self, t: Tensor, what: str) -> Tensor:
        return self.sum_async([t], what).wait()[0]

    # ------------------------------------------------------------------------- gradients
    def average_gradients(self, params: Sequence[torch.nn.Parameter], n_local: Optional[float],
                          ran: Sequence[bool] = ()) -> Callable[[], list[float]]:
        """Launches ``Σ_r w_r g_r / Σ_r w_r`` (``w_r = n_r``, or 1 where the rank does not know its
        example count) over every parameter; returns the function that waits and writes ``.grad``.
        A parameter without a gradient on some rank counts as zero there; it gets a gradient if
        any rank had one. A sparse gradient (``nn.Embedding(sparse=True)``) is summed dense and
        comes back dense. ``ran``: per-layer flags summed over the ranks in the same call; the
        returned function gives their sums."""
        w = 1.0 if n_local is None else float(n_local)
        ref = params[0]
        has = torch.tensor([p.grad is not None for p in params] + [float(r) for r in ran] + [w],
                           dtype=torch.float64, device=ref.device)
        grads = [(_dense(p.grad) * w if p.grad is not None else torch.zeros_like(p))
                 for p in params]
        pending = self.sum_async(grads + [has], "the gradient all-reduce")

        def finish() -> list[float]:
            *sums, meta = pending.wait()
            total = float(meta[-1])
            flags = meta[:len(params)].tolist()
            for p, s, f in zip(params, sums, flags):
                if not f:
                    continue
                s = s / total if total > 0 else s
                if p.grad is None or p.grad.layout != torch.strided:
                    p.grad = s.clone()
                else:
                    p.grad.copy_(s)
            return meta[len(params):-1].tolist()
        return finish

    # --------------------------------------------------------------------------- factors
    def average_factors(self, stats: list[Optional[LocalStatistics]],
                        templates: list[tuple[tuple[int, ...], tuple[int, ...], torch.dtype,
                                              torch.device]]) -> PendingFactors:
        """Weights this rank's statistics and launches their SUM (see the module docstring).

        ``stats[i]`` is layer i's local statistics or None (not captured here); ``templates[i]``
        the shapes of its A and G statistics with their dtype and device, so that a rank without
        them contributes zeros of the same layout."""
        L = len(stats)
        device = templates[0][3] if templates else torch.device("cpu")
        meta = torch.zeros(3 * L, dtype=torch.float64, device=device)
        for i, s in enumerate(stats):
            if s is not None:
                meta[i], meta[L + i] = s.a_weight, s.g_weight
                meta[2 * L + i] = float(s.a is not None)
        meta = self.sum_now(meta, "the factor-weight all-reduce").tolist()
        plan: list[tuple[bool, bool]] = []
        send: list[Tensor] = []
        for i, s in enumerate(stats):
            a_total, g_total, a_changed = meta[i], meta[L + i], meta[2 * L + i]
            send_g = g_total > 0
            send_a = send_g and a_total > 0 and a_changed > 0
            plan.append((send_a, send_g))
            a_shape, g_shape, dtype, device = templates[i]
            if send_a:
                if s is None:
                    send.append(torch.zeros(a_shape, dtype=dtype, device=device))
                else:
                    a = s.a if s.a is not None else s.recompute_a()
                    send.append(a * (s.a_weight / a_total))
            if send_g:
                send.append(torch.zeros(g_shape, dtype=dtype, device=device) if s is None
                            else s.g * (s.g_weight / g_total))
        pending = self.sum_async(send, "the factor all-reduce") if send else None
        return PendingFactors(plan, pending)

    # -------------------------------------------------------------------- eigendecompositions
    def decompose(self, mats: list[Tensor], prevs: Optional[list[Tensor]], units: list[int],
                  eigh: Callable[[list[Tensor], Optional[list[Tensor]]],
                                 list[Optional[tuple[Tensor, Tensor]]]]
                  ) -> list[Any]:
        """Eigendecompositions split across ranks: per matrix ``(values, vectors)``, None (failed
        on its owner, on every rank alike) or :data:`REMOTE` (another rank owns it and keeps it).

        ``units[i]`` is the layer of matrix i; with ``broadcast="gradients"`` a layer's matrices
        stay with the layer's owner, otherwise each matrix is a work item of cost n³."""
        if self.options.broadcast == "gradients":
            owners = [self.layer_owner[u] for u in units]
        else:
            owners = greedy_assign([eigh_cost(m.shape[0]) for m in mats], self.world)
        mine = [i for i, o in enumerate(owners) if o == self.rank]
        local = eigh([mats[i] for i in mine],
                     None if prevs is None else [prevs[i] for i in mine]) if mine else []
        results: list[Any] = [REMOTE] * len(mats)
        for i, r in zip(mine, local):
            results[i] = r
        if self.options.broadcast == "gradients":
            return results
        return self._share(owners, results, [(m.shape[0] * (m.shape[0] + 1) + 1, m) for m in mats],
                           _pack_eigh, _unpack_eigh, "the eigenbasis broadcast")

    # ------------------------------------------------------------ preconditioned gradients
    def owns(self, unit: int) -> bool:
        """Whether this rank computes layer ``unit``'s preconditioned gradient."""
        return self.options.broadcast != "gradients" or self.layer_owner[unit] == self.rank

    def share_preconditioned(self, units: list[int], grads: list[Tensor],
                             local: dict[int, Optional[Tensor]]) -> list[Optional[Tensor]]:
        """broadcast="gradients": every layer's preconditioned gradient from its owner (None where
        the owner had no eigenbasis, so every rank falls back alike). ``grads[i]`` gives the shape
        and dtype; ``local`` maps the units this rank owns to its results."""
        owners = [self.layer_owner[u] for u in units]
        results: list[Any] = [local.get(u, REMOTE) if o == self.rank else REMOTE
                              for u, o in zip(units, owners)]
        return self._share(owners, results, [(g.numel() + 1, g) for g in grads],
                           _pack_matrix, _unpack_matrix, "the preconditioned-gradient broadcast")

    def _share(self, owners: list[int], results: list[Any], sizes: list[tuple[int, Tensor]],
               pack: Callable[[Any, Tensor, Tensor], None],
               unpack: Callable[[Tensor, Tensor], Any], what: str) -> list[Any]:
        """One broadcast per (owner, dtype, device) of the owner's packed results."""
        groups: dict[tuple[int, torch.dtype, torch.device], list[int]] = {}
        for i, o in enumerate(owners):
            like = sizes[i][1]
            groups.setdefault((o, like.dtype, like.device), []).append(i)
        works, bufs = [], []
        for (owner, dtype, device), idx in sorted(groups.items(), key=lambda kv: kv[1][0]):
            buf = torch.empty(sum(sizes[i][0] for i in idx), dtype=dtype, device=device)
            if owner == self.rank:
                off = 0
                for i in idx:
                    n = sizes[i][0]
                    pack(results[i], sizes[i][1], buf[off:off + n])
                    off += n
            works.append(dist.broadcast(buf, self._src(owner), group=self.group, async_op=True))
            self.elements += buf.numel()
            bufs.append((idx, buf))
        self.calls += len(works)
        self._wait(works, what)
        out = list(results)
        for idx, buf in bufs:
            off = 0
            for i in idx:
                n = sizes[i][0]
                out[i] = unpack(buf[off:off + n], sizes[i][1])
                off += n
        return out


def _dense(t: Tensor) -> Tensor:
    return t if t.layout == torch.strided else t.to_dense()


def _pack_eigh(r: Optional[tuple[Tensor, Tensor]], like: Tensor, buf: Tensor) -> None:
    n = like.shape[0]
    if r is None:
        buf.zero_()  # buf[0] = 0: failed on its owner
        return
    buf[0] = 1.0
    buf[1:n + 1] = r[0]
    buf[n + 1:] = r[1].reshape(-1)


def _unpack_eigh(buf: Tensor, like: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    n = like.shape[0]
    if float(buf[0]) == 0.0:
        return None
    return buf[1:n + 1].clone(), buf[n + 1:].reshape(n, n).clone()


def _pack_matrix(v: Optional[Tensor], like: Tensor, buf: Tensor) -> None:
    if v is None or v is REMOTE:
        buf.zero_()
        return
    buf[0] = 1.0
    buf[1:] = v.reshape(-1)


def _unpack_matrix(buf: Tensor, like: Tensor) -> Optional[Tensor]:
    if float(buf[0]) == 0.0:
        return None
    return buf[1:].reshape(like.shape).clone()


def _is_ddp(model: torch.nn.Module) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def make_communicator(distributed: Any, model: torch.nn.Module, layer_costs: Sequence[float]
                      ) -> Optional[Communicator]:
    """The communicator for ``KFAC(distributed=...)``, or None (no collective calls at all).

    ``distributed``: None (auto: on when a process group of more than one rank is initialised),
    False (off), True (on; needs an initialised process group) or :class:`DistributedOptions`.
    World size 1 gives None."""
    if distributed is False:
        return None
    options = distributed if isinstance(distributed, DistributedOptions) else DistributedOptions()
    if distributed is not None and not isinstance(distributed, (bool, DistributedOptions)):
        raise TypeError("distributed must be None, a bool or a DistributedOptions, got "
                        f"{type(distributed).__name__}")
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if distributed is None:
            return None
        raise ValueError("ngcuda.KFAC(distributed=...): torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group(...) first (torchrun sets it up)")
    if dist.get_world_size(options.group) == 1:
        return None
    avg = (not _is_ddp(model)) if options.average_gradients is None else options.average_gradients
    return Communicator(options, layer_costs, avg)
