"""Data parallelism over a :class:`~tpmpi.core.mesh.Mesh`: gradients averaged across the DP replicas
with bucketed non-blocking Allreduces started during the backward pass (PyTorch DDP's scheme).

Buckets: the gradients are taken in backward order (the last layer first; within a layer bias,
then weight) and cut into buckets of at least ``bucket_bytes`` (a gradient is never split; a
new dtype starts a new bucket). Each bucket is one flat array and the layers' ``grad_weight`` /
``grad_bias`` become views into it, so the Allreduce works on the gradients themselves: no
packing copy. Every replica holds the same shard shapes (same TP coordinates), hence the same
buckets, started in the same order.

Overlap: a module with ``grad_ready`` callbacks (:class:`~tpmpi.ParallelMLP`) reports each
sub-layer as soon as its gradients are final; the ``Iallreduce`` of every bucket complete by
then is started at once (``self.allreduce_grads.start``, the operator's own overlap logic,
:class:`tpmpi.core.mappings.AllReduce`), so fc2's gradients travel while fc1's backward GEMMs
run. When backward returns (or raises), the started buckets are waited for, and on success the
sums scaled by ``1/dp``.
Whether MPI moves the data while the GEMMs run depends on its progress engine (without an
asynchronous progress thread, only during MPI calls -- here fc1's own collectives);
:func:`tpmpi.studies.overlap.measure_dp_overlap` measures what is hidden (OSU convention).
Without GPU-aware MPI (host staging) or with ``overlap=False`` the buckets are all-reduced
blocking after backward.

Errors: every DP collective follows an agreement over the whole mesh, so that a fault on one
replica (a bad input, a NaN with ``check_finite``, a replicated input that differs inside one
TP group) is the same ValueError on every rank of every replica, never a replica left waiting in
a DP Allreduce. Forward and backward each start with an agreement over the mesh (which
operation every rank is in, and backward's ``dy``) before the module's TP collectives, and end
with one on the module's outcome (an error that one TP group agreed on); backward's comes
before the buckets are waited for: on failure every rank first completes the bucket Iallreduces
that any replica started (their count is exchanged over the mesh), then all raise. The
gradients are then undefined (``zero_grad`` before the next step). Construction checks that
the replicas hold the same parameters (:func:`replica_differences`: crc32 of every local block,
one Allreduce over the DP group), as PyTorch DDP makes them so by broadcasting rank 0's.

:meth:`DataParallel.schedule_for` adds the buckets' Allreduces to a module's schedule, each
started at the gradient readiness (:class:`tpmpi.core.schedule.GradsReady`) that completes it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

from mpi4py import MPI

import numpy as np

from ..core.agreement import CALL_ORDER, Same, Text, agree, agree_checks
from ..core.args import check_int
from ..core.arrays import Array
from ..core.backend import backend_of
from ..core.comm import Staging
from ..core.dtypes import dtype_name
from ..core.mappings import AllReduce, Operator, Pending
from ..core.mesh import Mesh
from ..core.schedule import Collective, GradsReady, Schedule, Step
from .base import array_checksum
from .module import named_layers

_R = TypeVar("_R")
BUCKET_BYTES = 25 * 2**20
"""Default smallest bucket (PyTorch DDP's ``bucket_cap_mb=25``)."""


def _call(op: str) -> Same:
    """The ``call`` value of a DataParallel agreement (which operation every rank is in)."""
    return Same(Text(f"DataParallel {op}"), CALL_ORDER)


def replica_differences(mesh: Mesh, named: list[tuple[str, Array]]) -> list[tuple[str, list[int]]]:
    """``(name, DP ranks whose copy differs from DP rank 0's)`` for every array of ``named``
    (``(name, local block)``, the same list on every replica) whose copies are not bitwise
    equal across the replicas (crc32 of each block). Collective over ``mesh.dp_comm``: one
    Allreduce of two int64 per array (max of the checksum and of its negation), and an
    allgather of the checksums only when some differ."""
    if mesh.dp == 1 or not named:
        return []
    mine = np.array([int(array_checksum(backend_of(a), a)) for _, a in named], dtype=np.int64)
    both = np.concatenate([mine, -mine])
    mesh.dp_comm.Allreduce(MPI.IN_PLACE, both, op=MPI.MAX)
    if np.array_equal(both[:mine.size], -both[mine.size:]):
        return []
    every = mesh.dp_comm.allgather(mine)
    return [(name, [r for r, crcs in enumerate(every) if crcs[i] != every[0][i]])
            for i, (name, _) in enumerate(named) if len({int(c[i]) for c in every}) > 1]


class _Bucket:
    """A flat gradient buffer and the ``(layer, attribute, view)`` gradients it holds."""

    def __init__(self, xp: Any, entries: list[tuple[Any, str, Any]]) -> None:
        self.buffer = xp.empty(sum(g.size for _, _, g in entries), dtype=entries[0][2].dtype)
        self.entries, offset = [], 0
        for layer, name, grad in entries:
            view = self.buffer[offset:offset + grad.size].reshape(grad.shape)
            view[...] = grad
            setattr(layer, name, view)
            self.entries.append((layer, name, view))
            offset += grad.size
        self.layers = {id(layer) for layer, _, _ in entries}
        self.pending: Optional[Pending] = None


class DataParallel:
    """``module`` (a parallel layer or :class:`~tpmpi.ParallelMLP` built on ``mesh.tp``)
    replicated over the ``mesh.dp`` replicas; forward/backward pass through, and when
    backward returns every ``grad_weight`` / ``grad_bias`` is the mean over the replicas of
    their local gradients. Construction is collective over ``mesh.comm``; it replaces the
    module's gradient arrays by views into the buckets (build optimizers afterwards, from
    :meth:`parameters`).

    ``bucket_bytes``: smallest bucket (positive int, default 25 MiB as PyTorch DDP);
    ``overlap``: start each bucket's Iallreduce during backward (True) or all-reduce the
    buckets blocking after it (False). ``allreduce_grads`` is the buckets' operator (an
    :class:`~tpmpi.core.mappings.AllReduce` over ``mesh.dp_comm``): a tap attached to it
    (:func:`tpmpi.layers.module.attach_tap`) counts the DP Allreduces and the time blocked in
    them."""

    def __init__(self, module: Any, mesh: Mesh, *, bucket_bytes: int = BUCKET_BYTES,
                 overlap: bool = True) -> None:
        try:
            layers, not_module = [layer for _, layer in named_layers(module)], None
        except ValueError as exc:  # reported by every rank together
            layers, not_module = [], f"module: {exc}"

        def local_checks() -> None:
            if not_module:
                raise ValueError(not_module)
            if not isinstance(mesh, Mesh):
                raise ValueError(f"mesh is a {type(mesh).__name__}: expected a tpmpi.Mesh")
            check_int("bucket_bytes", bucket_bytes, 1)
            grid = getattr(module, "grid", None)
            same = grid is not None and MPI.Comm.Compare(grid.comm, mesh.tp.comm) in (
                MPI.IDENT, MPI.CONGRUENT)
            if not same:
                raise ValueError(f"module is built on {grid!r}: expected the mesh's TP grid "
                                 f"(mesh.tp, {mesh.tp.label})")

        agree_checks(getattr(mesh, "comm", MPI.COMM_WORLD), local_checks,
                     call=_call("construction"), bucket_bytes=bucket_bytes, overlap=bool(overlap))
        self.module, self.mesh, self.layers = module, mesh, layers
        self.bucket_bytes, self.overlap = int(bucket_bytes), bool(overlap)
        self.dp, self.dp_comm = mesh.dp, mesh.dp_comm
        self.backend = layers[0].backend
        self.staging = Staging(self.backend)
        self.allreduce_grads = AllReduce(self.dp_comm, self.staging, overlap=self.overlap)
        grads = [(layer, name, getattr(layer, name)) for layer in reversed(layers)
                 for name in ("grad_bias", "grad_weight") if getattr(layer, name) is not None]
        self._agree_gradients(grads)
        self._agree_parameters()
        self.buckets = self._bucket(grads)
        self.grad_bytes = sum(b.buffer.nbytes for b in self.buckets)
        self._active = False
        self._ready: set = set()
        self._started = 0
        # (shape, dtype) of the last forward output, to check dy against
        self._out: Optional[tuple[tuple[int, ...], Any]] = None
        if hasattr(module, "grad_ready"):
            module.grad_ready.append(self._layer_ready)

    def _agree_gradients(self, grads: list) -> None:
        """The same ValueError on every rank of the mesh unless every replica holds gradients of
        the same shapes and dtypes, in the same order. Collective (an allgather over the DP
        communicator, an agreement over the mesh)."""
        signature = [(type(layer).__name__, name, tuple(g.shape), dtype_name(g.dtype))
                     for layer, name, g in grads]
        others = self.dp_comm.allgather(signature)
        error = None
        if any(s != signature for s in others):
            ranks = [r for r, s in enumerate(others) if s != others[0]]
            error = (f"DataParallel: the replicas' gradients differ (shapes or dtypes on DP "
                     f"ranks {ranks} differ from DP rank 0's); every replica must build the "
                     "same module")
        agree(self.mesh.comm, error, call=_call("gradient layout"))

    def _agree_parameters(self) -> None:
        """The same ValueError on every rank of the mesh unless every replica holds the same
        parameter values (:func:`replica_differences`). Collective (one Allreduce over the DP
        communicator, an agreement over the mesh)."""
        differ = replica_differences(self.mesh, [(name, p) for name, p, _ in
                                                 self.module.parameters()])
        error = None
        if differ:
            error = "; ".join(f"{name} differs on DP rank(s) {', '.join(map(str, ranks))}"
                              for name, ranks in differ)
            error = (f"DataParallel: the replicas' parameters differ from DP rank 0's ({error}): "
                     "every replica must start from the same values (build them with the same "
                     "seed, or from_dense of the same matrices)")
        agree(self.mesh.comm, error, call=_call("parameter check"))

    def _bucket(self, grads: list) -> list[_Bucket]:
        """``grads`` ((layer, attribute, gradient) in backward order) cut into buckets of at
        least ``bucket_bytes``, a new dtype starting a new one (module docstring)."""
        buckets: list[_Bucket] = []
        group: list = []
        for entry in grads:
            if group and (entry[2].dtype != group[0][2].dtype
                          or sum(g.nbytes for _, _, g in group) >= self.bucket_bytes):
                buckets.append(_Bucket(self.backend.xp, group))
                group = []
            group.append(entry)
        if group:
            buckets.append(_Bucket(self.backend.xp, group))
        return buckets

    def operators(self) -> dict[str, Operator]:
        """The gradient averaging's operator (the module's own: ``module.operators()``)."""
        return {"allreduce_grads": self.allreduce_grads}

    # ------------------------------------------------------------------ passes

    def __call__(self, x: Array) -> Array:
        return self.forward(x)

    def forward(self, x: Array) -> Array:
        """``module(x)``; an error on any replica is raised on every rank of the mesh. Two
        agreements over the mesh: which operation every rank is in (before the module's TP
        collectives, so that a rank in another DataParallel call is reported, not left
        waiting on another communicator), then the module's outcome."""
        agree(self.mesh.comm, call=_call("forward"))
        y = self._outcome(lambda: self.module.forward(x), "forward")
        self._out = (tuple(y.shape), y.dtype)
        return y

    def _outcome(self, run: Any, op: str) -> Any:
        """``run()``, then an agreement over the mesh on its outcome: a ValueError (which the
        module's TP group raised together) on any replica is the same ValueError on every rank
        of the mesh. Any other exception, or a ValueError of a layer's local work between its
        collectives (kept in its :class:`~tpmpi.core.agreement.Settle`), is a fault of this
        rank alone, whose TP peers may be in a collective it will never join: it propagates at
        once (uncaught, it ends the job, :mod:`tpmpi.core.launch`)."""
        error, out = None, None
        try:
            out = run()
        except ValueError as exc:  # ranks in its message count in the TP group
            if any(getattr(getattr(layer, "_pending", None), "failed", None)
                   for layer in self.layers):
                raise  # this rank alone failed between a layer's collectives (Settle.failed)
            error = f"in the TP group of DP replica {self.mesh.dp_rank}: {exc}"
        agree(self.mesh.comm, error, call=_call(f"{op} outcome"))
        return out

    def backward(self, dy: Array) -> Array:
        """``module.backward(dy)`` with the DP gradient averaging (see the class docstring);
        returns dx. ``dy`` must match the last forward output (checked over the mesh)."""
        def local_checks() -> None:
            if self._out is None:
                raise ValueError("backward() called before forward()")
            if not self.backend.owns(dy):
                raise ValueError(f"dy is a {type(dy).__module__}.{type(dy).__name__}: "
                                 f"expected a {self.backend.name} array")
            if (tuple(dy.shape), dy.dtype) != self._out:
                raise ValueError(f"dy.shape={tuple(dy.shape)} dtype={dtype_name(dy.dtype)}: "
                                 f"expected {self._out[0]} {dtype_name(self._out[1])} (the "
                                 "forward output's)")
            self._check_views()

        agree_checks(self.mesh.comm, local_checks, call=_call("backward"))
        return self.averaged(lambda: self.module.backward(dy))

    def averaged(self, backward: Callable[[], _R]) -> _R:
        """``backward()`` (the module's backward pass, whatever its arguments) with the DP
        gradient averaging: the buckets started as the module reports its layers ready (or all
        after it), then waited for and scaled to means. Returns what ``backward`` returns. A
        model whose backward takes no ``dy`` (:class:`tpmpi.models.GPT`, whose loss ends it)
        calls this after agreeing on its own arguments. Collective over the mesh (the outcome
        is agreed on ``mesh.comm`` before the buckets are waited for)."""
        self._active, self._ready, self._started = True, set(), 0

        def run() -> _R:
            result = backward()
            self._layer_ready(*self.layers)  # a module without grad_ready callbacks
            return result

        try:
            result = self._outcome(run, "backward")
        except ValueError:  # every rank: complete the buckets any replica started, then raise
            self._active = False
            self._complete_started()
            raise
        except BaseException:  # e.g. KeyboardInterrupt: keep nothing pending here
            self._active = False
            for bucket in self.buckets[:self._started]:
                self._wait(bucket)
            raise
        self._active = False
        self._finish()
        return result

    def _complete_started(self) -> None:
        """After an agreed failure: start the buckets that another replica started and this one
        did not (their count, the most over the mesh, is exchanged on ``mesh.comm``, not on the
        DP communicator the buckets are in flight on), then wait for every started one. The
        sums are discarded with the step. Collective over the mesh."""
        started = self.mesh.comm.allreduce(self._started, op=MPI.MAX)
        for bucket in self.buckets[self._started:started]:
            self._start(bucket)
        for bucket in self.buckets[:started]:
            self._wait(bucket)
        self._started = len(self.buckets)

    def _layer_ready(self, *layers: Any) -> None:
        """``layers``' gradients are final: start every bucket complete by now, in order
        (without overlap its Allreduce runs blocking when waited for, after backward)."""
        if not self._active:
            return
        self._ready.update(id(layer) for layer in layers)
        while (self._started < len(self.buckets)
               and self.buckets[self._started].layers <= self._ready):
            self._start(self.buckets[self._started])
            self._started += 1

    def _check_views(self) -> None:
        """ValueError (local) when a layer's gradient is no longer its bucket view (re-assigned
        rather than updated in place): its averaging would not reach the layer."""
        for bucket in self.buckets:
            for layer, name, view in bucket.entries:
                if getattr(layer, name) is not view:
                    raise ValueError(f"{type(layer).__name__}.{name} was re-assigned: "
                                     "DataParallel averages the gradient arrays it placed "
                                     "(update them in place, e.g. grad[...] = 0, or call "
                                     "zero_grad())")

    def _start(self, bucket: _Bucket) -> None:
        if self.dp > 1:
            bucket.pending = self.allreduce_grads.start(bucket.buffer)  # Iallreduce, dp_comm

    def _wait(self, bucket: _Bucket) -> None:
        if bucket.pending is not None:
            bucket.pending.wait()
            bucket.pending = None

    def _finish(self) -> None:
        """Start what is left, wait for every bucket, scale the sums to means."""
        for bucket in self.buckets[self._started:]:
            self._start(bucket)
        self._started = len(self.buckets)
        if self.dp == 1:
            return
        for bucket in self.buckets:
            self._wait(bucket)
            bucket.buffer *= 1.0 / self.dp

    def allreduce_gradients(self) -> None:
        """Average the current gradients over the replicas now (every bucket, blocking on
        the same path as backward): the communication-only run of
        :func:`tpmpi.studies.overlap.measure_dp_overlap`. Collective over ``mesh.dp_comm`` (and
        an agreement over the mesh first)."""
        agree_checks(self.mesh.comm, self._check_views, call=_call("allreduce_gradients"))
        self._started = 0
        self._finish()

    # ------------------------------------------------------------------ module pass-through
    def zero_grad(self) -> None:
        """Zero the module's gradients (the bucket views stay in place)."""
        self.module.zero_grad()

    def parameters(self) -> list[tuple[str, Any, Any]]:
        """The module's ``(name, parameter, gradient)``; gradients are the bucket views."""
        return self.module.parameters()

    # ------------------------------------------------------------------ schedule
    @classmethod
    def schedule_for(cls, schedule: Schedule, dp: int, *, bucket_bytes: int = BUCKET_BYTES,
                     overlap: bool = True, staged: bool = False) -> Schedule:
        """``schedule`` (a module's, one replica's) with the gradient Allreduces over ``dp``
        replicas (group "dp") in its backward: the gradients of its
        :class:`~tpmpi.core.schedule.GradsReady` steps in order, cut into buckets as
        :class:`DataParallel` cuts them; each bucket's Allreduce starts at the readiness that
        completes it, during the rest of backward, one bucket after another, or with
        ``overlap=False`` (or ``staged``) all of them blocking after backward. Unchanged for
        ``dp=1`` or a forward-only schedule. No communication."""
        ready = [(i, s) for i, s in enumerate(schedule.backward) if isinstance(s, GradsReady)]
        if dp <= 1 or not ready:
            return schedule
        buckets: list[list] = []  # [bytes, dtype, index of the readiness that completes it]
        for i, step in ready:
            if not buckets or step.dtype != buckets[-1][1] or buckets[-1][0] >= bucket_bytes:
                buckets.append([0, step.dtype, i])
            buckets[-1][0] += step.nbytes
            buckets[-1][2] = i
        bwd: list[Step] = list(schedule.backward)
        if not overlap or staged:  # blocking after backward, in bucket order
            bwd += [Collective(f"allreduce_grads[{b}]", "allreduce", "dp", int(dp), size, dtype)
                    for b, (size, dtype, _) in enumerate(buckets)]
        work = [s.name for s in schedule.backward if not isinstance(s, GradsReady)]
        done = [0]  # done[j]: the steps of work among backward[:j] (one pass, not per bucket)
        for s in schedule.backward:
            done.append(done[-1] + (not isinstance(s, GradsReady)))
        for b, (size, dtype, i) in reversed(list(enumerate(buckets)) if overlap and not staged
                                            else []):
            rest = tuple(work[done[i + 1]:])
            bwd.insert(i + 1, Collective(f"allreduce_grads[{b}]", "allreduce", "dp", int(dp),
                                         size, dtype, rest))
        return Schedule(schedule.forward, tuple(bwd), schedule.param_bytes,
                        schedule.saved_bytes)
