"""The fence: the one protocol that keeps an engine from generating with half-written weights.

Every bridge (``connect()``'s :class:`~ipcbridge.bridge.Bridge`, ``stream()``'s
:class:`~ipcbridge.stream.StreamBridge`) fences its updates with :class:`Fence`, and every engine grants
its pause through a :class:`LeaseGate`: the embedded engine in its own process, vLLM engines (which have
no lease of their own) in the trainer's process.

Note [the fence]
    ``with bridge.update(): optimizer.step()``:
      1. pause: the bridge asks for a :class:`Lease`. The engine grants it once no other lease is held,
         closes the gate to new generations and waits until none is in flight.
      2. the block runs (an optimizer step only *enqueues* kernels on the trainer's stream).
      3. sync: the trainer's device work is synchronised, so every write has landed in the memory the
         engine reads (a stream bridge then copies its weights into the engine).
      4. resume: the lease's holder releases it. The engine drops the KV it computed with the old weights,
         moves its weight version one step forward and opens the gate.
    Steps 3 and 4 run whatever happens in 2 or 3 (an exception, Ctrl-C): the weights may be partly
    updated, and the engine must not stay paused. The version moves forward on every release, so no
    generation ever reports a version whose weights it did not see.

Note [owned, leased pauses]
    A pause belongs to the lease that took it; only that lease's id resumes it. A second lease waits for
    the first (up to ``wait`` seconds, then ``FenceError`` naming the holder). Asking again from the very
    thread that holds the pause (``update()`` nested in ``update()``, two bridges' fences nested, or a
    ``generate()`` inside the block) would wait for itself, so it fails at once. A lease lasts
    ``Lease.seconds``; a holder that dies, hangs or is interrupted never releases it, so the gate's
    watchdog releases it when it runs out: the engine resumes by itself, bumps the version (the weights
    may be half-written) and logs why. The requester picks the lease id, so a pause request interrupted
    before its answer arrives can still be cancelled by id.

Note [the fence, per engine]
    ============  =========================  ==================  ==============================  ============================  ==================
    engine        pause                      invalidate KV       publish version                 resume                        holder dies mid-fence
    ============  =========================  ==================  ==============================  ============================  ==================
    LocalEngine   lease in the engine:       prefix cache        engine: version + 1             gate opens                    engine's watchdog resumes at
                  gate closes, in-flight     cleared                                                                           lease end, version + 1
                  requests drain
    vllm.LLM      lease in the trainer's     reset_prefix_cache  worker's ipcbridge counter + 1  nothing to do (LLM.generate   engine dies with the trainer
                  process; LLM.generate                                                          blocks its caller)            (same process)
                  blocks, nothing in flight
    AsyncLLM      lease in the trainer's     reset_prefix_cache  worker's ipcbridge counter + 1  resume_generation             engine dies with the trainer;
                  process, then                                                                                                a hung holder: the watchdog
                  pause_generation("wait")                                                                                     resumes at lease end
    vllm serve    lease in the trainer's     POST                POST /collective_rpc            POST /resume                  hung: the watchdog resumes;
                  process, then POST         /reset_prefix_      (worker counter + 1)                                          dead: the server stays paused
                  /pause?mode=wait           cache                                                                             until ``POST /resume``
    ============  =========================  ==================  ==============================  ============================  ==================
    For vLLM, "invalidate KV" is ``reset_prefix_cache`` with ``kv_reset="always"`` (the default), and
    nothing with ``kv_reset="salted"`` or without prefix caching (Note [stale KV: reset or salt] in
    :mod:`ipcbridge.vllm.base`); the pause is the engine core's ``mode="wait"`` pause with
    ``clear_cache=False`` (Note [the AsyncLLM pause] in :mod:`ipcbridge.vllm.endpoints`), and from vLLM
    0.27 the publish also sets vLLM's own weight version.
    Step 3 (device sync) is always the trainer's: ``torch.cuda.synchronize`` of every device its
    parameters are on. vLLM has no lease of its own, so a trainer process that dies while it holds
    ``vllm serve``'s pause leaves it paused: resume it with ``curl -X POST http://host:port/resume``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ipcbridge.errors import FenceError

logger = logging.getLogger(__name__)

#: Default lease: long enough for an optimizer step of a large model, short enough to notice a hang.
DEFAULT_LEASE_SECONDS = 120.0
#: Default wait for another holder's lease to end.
DEFAULT_WAIT_SECONDS = 60.0


def caller_id() -> str:
    """This thread, as a lease's requester (Note [owned, leased pauses]): ``pid/thread ident``."""
    return f"{os.getpid()}/{threading.get_ident()}"


@dataclass(frozen=True)
class Lease:
    """One pause of one engine. Crosses to the engine process as its fields (all plain values)."""

    #: Chosen by the requester, so an interrupted request can be cancelled by it.
    id: str
    #: Who holds it, for error messages and logs.
    holder: str
    #: How long it lasts unless renewed.
    seconds: float
    #: The requesting thread (:func:`caller_id`); a request from the same thread never waits for it.
    caller: str = field(default_factory=caller_id)

    def __post_init__(self) -> None:
        for name in ("id", "holder", "caller"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise FenceError(f"lease.{name} must be a non-empty string, got {getattr(self, name)!r}")
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) or not self.seconds > 0:
            raise FenceError(f"lease seconds must be a positive number, got {self.seconds!r}; pass lease_seconds > 0")

    @classmethod
    def new(cls, holder: str, seconds: float) -> Lease:
        return cls(id=secrets.token_hex(8), holder=holder, seconds=float(seconds))

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "holder": self.holder, "seconds": self.seconds, "caller": self.caller}


@dataclass
class _Held:
    lease: Lease
    since: float
    expires: float
    #: Step 4 for this lease, if not the gate's own (an in-process lease resumes through its endpoint).
    resume: Callable[[str], int] | None = None
    drained: bool = False
    #: Resuming has begun (with the lock released): the lease can no longer be renewed, released or cancelled.
    ending: bool = False


#: Cancelled lease ids remembered for requests still on their way; a few are plenty.
_MAX_CANCELLED = 256


class LeaseGate:
    """The owned, leased pause of one engine, with in-flight counting. Thread-safe.

    ``resume(reason) -> version`` is the engine's step 4 of Note [the fence]: drop stale KV, move the
    version forward, let generation continue; the gate calls it on every release and on expiry, with the
    gate's lock held, so no new lease or generation starts before it has finished.
    """

    def __init__(self, resume: Callable[[str], int], name: str = "the engine") -> None:
        self._resume = resume
        self.name = name
        self._cv = threading.Condition()
        self._held: _Held | None = None
        self._inflight = 0
        self._cancelled: dict[str, None] = {}  # insertion-ordered, bounded by _MAX_CANCELLED
        self._watchdog: threading.Thread | None = None

    # -- generation ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def enter(self, caller: str, wait: float) -> Iterator[None]:
        """Count one generation in flight, waiting at most ``wait`` seconds while the engine is paused."""
        with self._cv:
            held = self._held
            if held is not None and held.lease.caller == caller:
                raise FenceError(
                    f"{self.name} is paused by {held.lease.holder}, in this very thread: this request would wait "
                    "for itself. Generate outside the `with bridge.update():` block"
                )
            if not self._cv.wait_for(lambda: self._held is None, wait):
                raise FenceError(self._busy(f"this request waited {wait:.1f}s for it"))
            self._inflight += 1
        try:
            yield
        finally:
            with self._cv:
                self._inflight -= 1
                self._cv.notify_all()

    def _busy(self, what: str) -> str:
        held = self._held
        if held is None:
            return f"{self.name} was paused; {what}"
        now = time.monotonic()
        return (
            f"{self.name} is paused by {held.lease.holder} (for {now - held.since:.1f}s; its lease ends in "
            f"{max(0.0, held.expires - now):.1f}s); {what}. Wait for that update to finish, or raise the wait"
        )

    # -- leases ----------------------------------------------------------------------------------------

    def acquire(self, lease: Lease, wait: float, drain: float | None = None,
                resume: Callable[[str], int] | None = None) -> None:
        """Take the pause for ``lease``: wait for any other holder, then (with ``drain``) for in-flight work.

        Raises ``FenceError`` at once if ``lease.caller`` already holds the pause, after ``wait`` seconds if
        another holder keeps it, and if the request is cancelled meanwhile. On any failure the gate is
        left as it was. ``resume`` replaces the gate's own step 4 for this lease.
        """
        with self._cv:
            held = self._held
            if held is not None and held.lease.caller == lease.caller:
                raise FenceError(
                    f"{self.name} is already paused by {held.lease.holder} in this very thread; a nested fence "
                    "would wait for itself forever. Finish the outer `with bridge.update():` block first (one "
                    "fence at a time per thread)"
                )
            if not self._cv.wait_for(lambda: self._held is None or lease.id in self._cancelled, wait):
                raise FenceError(self._busy(f"{lease.holder} waited {wait:.1f}s for it"))
            self._check_not_cancelled(lease)
            now = time.monotonic()
            self._held = _Held(lease, since=now, expires=now + lease.seconds, resume=resume)
            self._start_watchdog()
            if drain is None:
                self._held.drained = True
                return
            if not self._cv.wait_for(lambda: self._inflight == 0 or lease.id in self._cancelled, drain):
                self._held = None
                self._cv.notify_all()
                raise FenceError(
                    f"in-flight generation in {self.name} did not finish within {drain:.1f}s, so the pause was "
                    "not taken; retry, or raise the drain timeout"
                )
            self._check_not_cancelled(lease)
            self._held.drained = True

    def _check_not_cancelled(self, lease: Lease) -> None:
        if lease.id in self._cancelled:
            del self._cancelled[lease.id]
            if self._held is not None and self._held.lease.id == lease.id:
                self._held = None
            self._cv.notify_all()
            raise FenceError(f"the pause request of {lease.holder} was cancelled before it was granted")

    def renew(self, lease_id: str) -> float:
        """Extend the lease by its length from now; the seconds it has left. ``FenceError`` if not held."""
        with self._cv:
            held = self._holder(lease_id, "renew")
            held.expires = time.monotonic() + held.lease.seconds
            self._cv.notify_all()
            return held.lease.seconds

    def release(self, lease_id: str) -> int:
        """Resume the engine (Note [the fence] step 4) for the lease's holder; the new weight version."""
        with self._cv:
            self._holder(lease_id, "resume")
            return self._end(f"released by its holder (lease {lease_id})")

    def cancel(self, lease_id: str) -> None:
        """Withdraw ``lease_id``'s request, or release its pause; nothing if it is unknown.

        Releasing resumes the engine (its step 4), whose errors are logged, not raised: a cancel runs while
        another error is already on its way.
        """
        with self._cv:
            held = self._held
            if held is not None and held.lease.id == lease_id and held.ending:
                return
            if held is not None and held.lease.id == lease_id and held.drained:
                try:
                    self._end(f"cancelled by its holder (lease {lease_id})")
                except Exception as e:
                    logger.warning("%s: resuming after a cancelled pause failed: %s", self.name, e)
                return
            self._cancelled[lease_id] = None
            while len(self._cancelled) > _MAX_CANCELLED:
                del self._cancelled[next(iter(self._cancelled))]
            self._cv.notify_all()

    @property
    def holder(self) -> str | None:
        held = self._held
        return None if held is None else held.lease.holder

    @property
    def paused(self) -> bool:
        return self._held is not None

    def _holder(self, lease_id: str, what: str) -> _Held:
        held = self._held
        if held is None or held.lease.id != lease_id or held.ending:
            now = "not paused" if held is None else f"paused by {held.lease.holder}"
            raise FenceError(
                f"cannot {what} {self.name}: lease {lease_id} is not the one holding its pause ({now}). Its lease "
                "ran out and the engine resumed by itself (weights written after that may have been served "
                "half-written): raise lease_seconds, or call bridge.renew() during long updates"
            )
        return held

    def _end(self, reason: str) -> int:
        """Resume and clear the lease; called with the lock held. The lease ends even if resuming raises.

        Resuming may take long (an RPC to the engine), so the lock is released meanwhile: other requests
        keep waiting on the condition, with their own timeouts, since ``_held`` stays set until the end.
        """
        held = self._held
        assert held is not None and not held.ending  # callers checked; never reached from user input
        held.ending = True
        resume = held.resume or self._resume
        self._cv.release()
        try:
            return resume(reason)
        finally:
            self._cv.acquire()
            self._held = None
            self._cv.notify_all()

    # -- expiry ----------------------------------------------------------------------------------------

    def _start_watchdog(self) -> None:
        if self._watchdog is None or not self._watchdog.is_alive():
            self._watchdog = threading.Thread(target=self._watch, name="ipcbridge-lease-watchdog", daemon=True)
            self._watchdog.start()

    def _watch(self) -> None:
        with self._cv:
            while self._held is not None:
                held = self._held
                remaining = held.expires - time.monotonic()
                if remaining > 0 or held.ending:
                    self._cv.wait(remaining if remaining > 0 else 0.05)
                    continue
                logger.warning(
                    "%s: the lease of %s ran out after %.1fs without being released or renewed (the holder died, "
                    "hung or was interrupted); resuming and moving the weight version forward, since the weights "
                    "may be half-written", self.name, held.lease.holder, held.lease.seconds,
                )
                try:
                    self._end(f"lease of {held.lease.holder} expired")
                except Exception:
                    logger.exception("%s: resuming after an expired lease failed", self.name)
            self._watchdog = None


def cuda_devices(tensors: Iterable[torch.Tensor]) -> list[torch.device]:
    """The CUDA devices ``tensors`` live on, each once."""
    return sorted({t.device for t in tensors if t.device.type == "cuda"}, key=str)


def synchronize(devices: Iterable[torch.device]) -> None:
    """Step 3 of Note [the fence]: wait for all device work on ``devices`` (those of the parameters an
    update may write: :func:`cuda_devices`)."""
    for device in devices:
        torch.cuda.synchronize(device)


def check_settings(lease_seconds: float, wait: float) -> None:
    """``FenceError`` unless ``lease_seconds`` > 0 and ``wait`` >= 0 (``connect``/``stream`` check first)."""
    for what, value, least in (("lease_seconds", lease_seconds, 0.0), ("wait", wait, -1.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > least:
            bound = "a positive number" if least == 0.0 else "a number >= 0"
            raise FenceError(f"{what} must be {bound} of seconds, got {value!r}")


class Pausable(Protocol):
    """What :class:`Fence` needs of an endpoint (see :class:`ipcbridge.endpoints.Endpoint`)."""

    def pause(self, lease: Lease, wait: float) -> None: ...

    def renew(self, lease: Lease) -> None: ...

    def resume(self, lease: Lease) -> int: ...

    def cancel(self, lease: Lease) -> None: ...


class Fence:
    """One bridge's side of Note [the fence]: ``with fence.hold(): ...`` pauses, runs, syncs, resumes.

    ``sync`` is step 3 (the trainer's device synchronisation); ``hold(commit=...)`` adds work that must
    run inside the pause after the sync (a stream bridge's transfer). ``version`` is the engine's weight
    version after the last resume; ``seconds`` the time each fence kept the engine paused, minus the block.
    """

    def __init__(self, endpoint: Pausable, *, holder: str, version: int, sync: Callable[[], None],
                 lease_seconds: float = DEFAULT_LEASE_SECONDS, wait: float = DEFAULT_WAIT_SECONDS) -> None:
        check_settings(lease_seconds, wait)
        self.endpoint = endpoint
        self.holder = holder
        self.version = version
        self.lease_seconds = lease_seconds
        self.wait = wait
        self.seconds: list[float] = []
        self._sync = sync
        self._lease: Lease | None = None

    @property
    def active(self) -> bool:
        return self._lease is not None

    def renew(self) -> None:
        """Extend the current lease (a long update); ``FenceError`` outside a fence."""
        if self._lease is None:
            raise FenceError("renew() outside `with bridge.update():`: there is no pause to extend")
        self.endpoint.renew(self._lease)

    @contextlib.contextmanager
    def hold(self, commit: Callable[[], None] | None = None) -> Iterator[Lease]:
        if self._lease is not None:
            raise FenceError(
                f"{self.holder}: update() nested in update() of the same bridge; the inner block's resume would let "
                "the engine generate while the outer block still writes. Use one `with bridge.update():` per step"
            )
        lease = Lease.new(f"{self.holder} (thread {threading.current_thread().name!r})", self.lease_seconds)
        t0 = time.perf_counter()
        try:
            self.endpoint.pause(lease, self.wait)
        except BaseException:
            _quietly(self.endpoint.cancel, lease, "cancel the pause request")  # Ctrl-C while waiting
            raise
        paused = time.perf_counter() - t0
        try:  # from here on the pause is held: anything that raises (Ctrl-C too) must release it
            self._lease = lease
            yield lease
        except BaseException:
            self._finish(lease, failed=True, commit=None, paused=paused)
            raise
        self._finish(lease, failed=False, commit=commit, paused=paused)

    def _finish(self, lease: Lease, *, failed: bool, commit: Callable[[], None] | None, paused: float) -> None:
        """Steps 3 and 4 of Note [the fence]; after a failure they still run, and their errors are logged."""
        t1 = time.perf_counter()
        try:
            if failed:
                _quietly(self._sync, None, "synchronise the trainer's device")
            else:
                self._sync()
                if commit is not None:
                    commit()
        except BaseException:
            self._resume(lease, quiet=True)
            raise
        finally:
            self.seconds.append(paused + time.perf_counter() - t1)
        self._resume(lease, quiet=failed)

    def _resume(self, lease: Lease, quiet: bool) -> None:
        self._lease = None
        if quiet:
            version = _quietly(self.endpoint.resume, lease, "resume the engine")
        else:
            version = self.endpoint.resume(lease)
        if isinstance(version, int):
            self.version = version

    def median_seconds(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


def _quietly(fn: Callable[..., object], arg: object, what: str) -> object:
    """Run ``fn(arg)`` (or ``fn()``) while another error is being raised: log a failure, don't mask that error."""
    try:
        return fn() if arg is None else fn(arg)
    except Exception as e:
        logger.warning("could not %s while handling another error: %s", what, e)
        return None
