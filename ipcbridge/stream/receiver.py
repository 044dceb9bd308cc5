"""The engine's side of a weight stream: receive a trainer's broadcasts into the engine's own tensors.

The embedded engine (:mod:`ipcbridge.engine.core`) owns one :class:`StreamReceiver` and forwards its
``stream_init``, ``stream_receive`` and ``stream_close`` requests to it. The trainer's side is
:mod:`ipcbridge.stream.bridge`.

Note [streamed weights]
    Where the trainer cannot map the engine's weights (another GPU or node), ``ipcbridge.stream``
    broadcasts its own weights into them. ``init`` checks the trainer's plan against ``weights`` once and
    keeps it, then joins the trainer's private process group as rank 1; ``receive`` (only while the engine
    is paused) receives every bucket and copies it into ``weights`` in place, so the engine's HF model
    views and every exported handle see the new values. Any failure closes the group, which makes the
    trainer's pending broadcasts fail at once rather than at the timeout (Note [failure and teardown] in
    :mod:`ipcbridge.stream.protocol`). The engine serves one stream at a time, the newest: a request naming
    an older stream is refused, so a replaced trainer can never write into the new one's pushes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import Any

import torch

from ipcbridge.stream.group import TorchGroup, check_backend, client_store
from ipcbridge.stream.plan import StreamPlan
from ipcbridge.stream.protocol import READY_KEY, new_buffers, receive

logger = logging.getLogger(__name__)


class StreamReceiver:
    """The stream state of one engine over its ``weights``, which it writes in place and never replaces.

    ``weights`` stay the engine's: the receiver copies into them only inside :meth:`receive`, under the
    engine's forward ``lock``. ``counters`` (the engine's stats) gains ``stream_receives`` and
    ``stream_bytes``. Requests are served one at a time; errors are ``ValueError`` (a plan that does not fit)
    or ``RuntimeError`` (no such stream, not paused, a failed transfer), which the engine reports to the
    trainer.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], device: torch.device,
                 counters: MutableMapping[str, Any] | None = None) -> None:
        self.weights = weights
        self.device = torch.device(device)
        self.counters: MutableMapping[str, Any] = {} if counters is None else counters
        self.group: TorchGroup | None = None  # while a trainer streams weights
        self.backend = ""
        self.stream_id = ""  # chosen by the trainer: requests of a replaced stream must not use the new one
        self.plan: StreamPlan | None = None  # checked against the weights at init, used by every receive
        #: The two receive buffers of the current stream: allocated at its first push, kept until it closes, so
        #: pushes allocate nothing and memory stays flat.
        self._buffers: list[torch.Tensor] | None = None
        self._lock = threading.Lock()  # one stream operation at a time

    def _check_plan(self, plan: StreamPlan) -> None:
        slots = {s.name: s for s in plan.slots}
        missing = sorted(self.weights.keys() - slots.keys())
        extra = sorted(slots.keys() - self.weights.keys())
        if missing or extra:
            raise ValueError(
                f"the stream plan does not cover this engine's weights: missing {missing[:8]}, unknown "
                f"{extra[:8]}; build it from this engine's manifest"
            )
        for name, t in self.weights.items():
            s = slots[name]
            if s.shape != tuple(t.shape) or s.torch_dtype != t.dtype:
                raise ValueError(
                    f"{name}: the stream plan has {s.dtype} {list(s.shape)}, this engine holds {t.dtype} "
                    f"{list(t.shape)}; build the plan from this engine's manifest"
                )

    def rebind(self, weights: Mapping[str, torch.Tensor], check: bool = True) -> None:
        """Write into ``weights`` from now on: the engine re-allocated its tensors (vLLM's ``wake_up`` after
        ``sleep``). With ``check``, the current stream's plan is checked against them first (``ValueError``
        if it no longer fits; the stream is then closed, since the trainer's next push could not land);
        without (a new stream is about to be checked against them), it is not."""
        with self._lock:
            old, self.weights = self.weights, weights
            if check and self.plan is not None and self.group is not None:
                try:
                    self._check_plan(self.plan)
                except ValueError:
                    self.weights = old
                    self._close()
                    raise

    def init(self, stream_id: str, host: str, port: int, backend: str, timeout: float,
             plan_dict: Mapping[str, Any]) -> None:
        """Check ``plan_dict`` against the weights, then join the trainer's group at ``host:port`` as rank 1.

        Replaces any previous stream. Blocks until the trainer has joined too (or ``timeout``).
        """
        with self._lock:
            plan = StreamPlan.from_dict(plan_dict)
            self._check_plan(plan)
            check_backend(backend, self.device if backend == "nccl" else "cpu")
            self._close()  # a new trainer replaces the previous one
            store = client_store(host, port, timeout)
            # Tells the trainer its request passed the checks, so it may block joining the group.
            store.set(READY_KEY, "1")
            self.group = TorchGroup.join(store, 1, 2, backend, timeout, host)
            self.backend, self.stream_id, self.plan = backend, stream_id, plan

    def _load(self, views: dict[str, torch.Tensor]) -> None:
        # The views alias a receive buffer that takes the next-but-one bucket: copy now. no_grad: vLLM makes
        # some weights plain ``nn.Parameter``s (RMSNorm's, requires_grad=True), and autograd refuses an
        # in-place write into a leaf that requires grad (found on the first push into real vLLM 0.25.1).
        with torch.no_grad():
            for name, view in views.items():
                self.weights[name].copy_(view)

    def receive(self, stream_id: str, *, paused: bool, lock: AbstractContextManager[Any]) -> dict[str, Any]:
        """Receive one push of the plan into the weights; ``{"bytes", "seconds"}`` once every bucket is loaded.

        ``paused``: whether the engine is paused (generation would otherwise read half-written weights);
        ``lock``: the engine's forward lock, held while the weights are written. Any failure, a refusal
        because the engine is not paused included, closes the stream (the trainer is already sending).
        """
        with self._lock:
            group = self.group
            if group is None or stream_id != self.stream_id:
                raise RuntimeError(
                    "this weight stream is not open in the engine (closed after a failure, or replaced by a newer "
                    "ipcbridge.stream()); open a new stream"
                )
            t0 = time.perf_counter()
            error = None
            try:
                if not paused:
                    raise RuntimeError("weights can be streamed in only while the engine is paused; pause first")
                device = self.device if self.backend == "nccl" else torch.device("cpu")
                if self._buffers is None:
                    self._buffers = new_buffers(self.plan, device)
                with lock:
                    # Note [a failed load drains the push]: a broadcast's sender hears of a failed load only
                    # at the end of the push; the shared buffer's trainer is interrupted at once instead (Note
                    # [who notices a failure] in ipcbridge.stream.ipc), and waits for every bucket's signal.
                    nbytes = receive(group, self.plan, self._load, device=device, buffers=self._buffers,
                                     drain=self.backend != "ipc")
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            del group
            if error is not None:
                # Outside the except block, so no traceback keeps the failed group (and its connections) alive.
                self._close(abort=True)
                raise RuntimeError(f"receiving streamed weights failed, stream closed: {error}")
            self.counters["stream_receives"] = self.counters.get("stream_receives", 0) + 1
            self.counters["stream_bytes"] = self.counters.get("stream_bytes", 0) + nbytes
            return {"bytes": nbytes, "seconds": time.perf_counter() - t0}

    def _close(self, abort: bool = False) -> None:
        self._buffers = None
        group, self.group = self.group, None
        if group is not None:
            group.close(abort=abort)
            logger.info("weight stream closed")

    def close(self, stream_id: str | None = None, wait: float = -1) -> None:
        """Leave the trainer's group (only if it is ``stream_id``'s; any with ``None``).

        ``wait``: seconds to wait for a running stream operation (-1: no limit).
        """
        if not self._lock.acquire(timeout=wait):
            logger.warning("a stream operation is still running; not closing its group")
            return
        try:
            if stream_id is None or stream_id == self.stream_id:
                self._close()
        finally:
            self._lock.release()
