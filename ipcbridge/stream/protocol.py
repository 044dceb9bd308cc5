"""The wire protocol of a weight stream: a plan's buckets, double-buffered, over a two-rank group.

Pure over a duck-typed *group*: an object with ``rank`` and ``broadcast(tensor, src) -> work`` (with
``work.wait()``). :class:`~ipcbridge.stream.group.TorchGroup` is the real one (gloo or NCCL); the tests use
one in memory. Rank 0 (the trainer) calls :func:`send`, rank 1 (the engine) :func:`receive`.

Note [double buffering]
    Two flat buffers alternate. The sender packs bucket i+1 into one while bucket i's asynchronous broadcast
    still reads the other; before packing bucket i+2 into a buffer it waits for bucket i's broadcast, which
    used that buffer. The receiver posts the broadcast for bucket i+1 before it loads bucket i, so the wire
    is busy while it copies; the buffer it posts into held bucket i-1, which is loaded already. On CUDA the
    same order holds on streams: NCCL's stream waits for the current stream before a collective, and
    ``work.wait()`` makes the current stream wait for NCCL, so packing, loading and reuse are ordered
    without blocking the CPU. Packing, the wire and loading overlap; memory stays at two buckets.

Note [failure and teardown]
    A failed collective leaves a group unusable (the ranks no longer agree on which broadcast is next), so
    whichever side fails closes its group. For gloo, dropping the process group closes its connections, and
    the peer's pending broadcasts then fail at once ("connection closed by peer") instead of at the
    timeout; a dead process closes them the same way. A peer that is alive but stuck is caught by the
    group's timeout. On error, :func:`send` and :func:`receive` first wait for the broadcasts they already
    posted (they complete or fail quickly), so no broadcast is left running on a buffer being freed.

Note [a failed load drains the push]
    A ``load`` that raises (a weight autograd refuses to write, a device error) is not a failed collective:
    the group still agrees on the next broadcast. Stopping there would leave the sender blocked in its next
    broadcast, and NCCL does not wake a peer when the other side aborts: on the first push into real vLLM
    the trainer sat out its whole 120 s timeout. So :func:`receive` keeps receiving the rest of the push
    without loading it and raises the load's error after the last bucket: the sender's push completes and
    the engine's error reaches the trainer at once. The weights are partly written either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch

from ipcbridge.stream.plan import Bucket, StreamPlan, pack, unpack

logger = logging.getLogger(__name__)

#: Key the engine sets in the trainer's rendezvous store once it has accepted a ``stream_init``, before it
#: joins the group: until then the trainer watches for a refusal instead of blocking in the join.
READY_KEY = "ipcbridge/stream/ready"


class Work(Protocol):
    def wait(self) -> Any: ...


class Group(Protocol):
    """What :func:`send` and :func:`receive` need of a process group."""

    rank: int

    def broadcast(self, tensor: torch.Tensor, src: int) -> Work:
        """Start broadcasting ``tensor`` from rank ``src`` into every rank's ``tensor``; return at once."""


#: ``(bucket, out) -> None``: fills ``out[:bucket.nbytes]`` with the bucket's tensors.
Packer = Callable[[Bucket, torch.Tensor], None]


def _drain(works: Iterable[Work | None]) -> None:
    for w in works:
        if w is not None:
            try:
                w.wait()
            except Exception:  # the error that brought us here is the one to report
                logger.debug("a pending broadcast failed while unwinding", exc_info=True)


def new_buffers(plan: StreamPlan, device: torch.device | str) -> list[torch.Tensor]:
    """The two flat buffers of Note [double buffering], each ``plan.buffer_bytes`` long, on ``device``."""
    return [torch.empty(plan.buffer_bytes, dtype=torch.uint8, device=device) for _ in range(2)]


def _buffers(plan: StreamPlan, device: torch.device | str,
             given: Sequence[torch.Tensor] | None = None) -> Sequence[torch.Tensor]:
    if given is None:
        return new_buffers(plan, device)
    if len(given) != 2 or any(b.dtype != torch.uint8 or b.dim() != 1 or b.numel() < plan.buffer_bytes
                              for b in given):
        raise ValueError(f"pass two 1-d uint8 buffers of at least plan.buffer_bytes ({plan.buffer_bytes}) bytes")
    return given


def send(group: Group, source: Mapping[str, torch.Tensor] | Packer, plan: StreamPlan, *,
         device: torch.device | str = "cpu", buffers: Sequence[torch.Tensor] | None = None) -> int:
    """Broadcast ``plan``'s buckets from ``group.rank``; return the bytes sent. See Note [double buffering].

    ``source`` is either the tensors by name (packed with :func:`~ipcbridge.stream.plan.pack`) or a callable
    ``(bucket, out) -> None`` that fills ``out[:bucket.nbytes]`` itself (how a trainer packs straight from
    HF tensors). The two flat buffers on ``device`` belong to this call: a packer must not keep ``out`` or
    views of it, and they are freed on return. ``buffers``: two buffers the caller allocated once and keeps
    for every push (memory stays flat, nothing is allocated per push); they are free again on return. Returns once every broadcast this rank posted has completed
    (on CUDA: once the current stream is ordered after them).
    """
    packer: Packer = source if callable(source) else (lambda b, out: pack(source, b, out))
    if not plan.buckets:
        return 0
    buffers = _buffers(plan, device, buffers)
    pending: list[Work | None] = [None, None]
    try:
        for i, bucket in enumerate(plan.buckets):
            k = i % 2
            if pending[k] is not None:
                pending[k].wait()  # bucket i-2's broadcast still reads this buffer
                pending[k] = None
            packer(bucket, buffers[k])
            pending[k] = group.broadcast(buffers[k][: bucket.nbytes], group.rank)
        last = (len(plan.buckets) - 1) % 2
        for k in (1 - last, last):  # in posting order
            w, pending[k] = pending[k], None
            if w is not None:
                w.wait()
    except BaseException:
        _drain(pending)
        pending[:] = [None, None]  # a gloo work holds its group's connections open: let the group close
        raise
    return plan.wire_bytes


def receive(group: Group, plan: StreamPlan, load: Callable[[dict[str, torch.Tensor]], None], *, src: int = 0,
            device: torch.device | str = "cpu", buffers: Sequence[torch.Tensor] | None = None,
            drain: bool = True) -> int:
    """Receive ``plan``'s buckets broadcast by rank ``src``; return the bytes received.

    ``load(views)`` is called once per bucket, in order, with :func:`~ipcbridge.stream.plan.unpack` views of
    the bucket; it must copy them where they belong before returning: the buffer under them takes the
    next-but-one bucket, and the two buffers (on ``device``, owned by this call) are freed on return. See
    Note [double buffering]. ``buffers``: as for :func:`send`, two buffers the caller keeps across pushes.
    ``drain``: after a failed ``load``, receive the rest of the push before raising (Note [a failed load
    drains the push]); ``False`` raises at once, for a group whose sender learns of the failure by itself.
    """
    n = len(plan.buckets)
    if n == 0:
        return 0
    buffers = _buffers(plan, device, buffers)

    def post(i: int) -> Work:
        return group.broadcast(buffers[i % 2][: plan.buckets[i].nbytes], src)

    pending: dict[int, Work] = {0: post(0)}
    failed: Exception | None = None
    try:
        for i, bucket in enumerate(plan.buckets):
            if i + 1 < n:
                pending[i + 1] = post(i + 1)  # its buffer held bucket i-1, loaded already
            pending.pop(i).wait()
            if failed is None:
                try:
                    load(unpack(buffers[i % 2], bucket))
                except Exception as e:  # Note [a failed load drains the push]
                    if not drain:
                        raise
                    failed = e
    except BaseException as e:
        _drain(pending[k] for k in sorted(pending))
        pending.clear()  # a gloo work holds its group's connections open: let the group close
        if failed is not None and isinstance(e, Exception):
            raise failed  # noqa: B904 (the cause is the load; the later group failure stays its __context__)
        raise
    if failed is not None:
        raise failed
    return plan.wire_bytes
