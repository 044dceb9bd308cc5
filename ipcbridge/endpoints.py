"""Endpoints: the control channel of one engine, as bridges need it. The extension point for new engines.

An endpoint exports the engine's weights (:meth:`Endpoint.manifest`) and grants its pause as a lease
(:meth:`~Endpoint.pause` / :meth:`~Endpoint.renew` / :meth:`~Endpoint.resume` / :meth:`~Endpoint.cancel`;
Note [the fence] in :mod:`ipcbridge.fence`). Optional capabilities are Protocols of their own, checked with
``isinstance``: :class:`CanSample` (greedy tokens with the engine's logprobs, for ``Bridge.check``) and
:class:`CanReceiveStream` (streamed weights, for ``ipcbridge.stream``).

To support a new engine, write a class with these methods and either pass an instance to ``connect`` or
give the engine object an ``ipcbridge_endpoint()`` method returning one. Engines that have no lease of
their own (vLLM) subclass :class:`InProcessLeases`, which keeps their leases in the trainer's process.
Endpoints for engines outside the core are found lazily by module path (:data:`ENDPOINTS`), so that
``import ipcbridge`` never imports vLLM.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import threading
import weakref
from collections.abc import Coroutine, Mapping
from typing import Any, Protocol, runtime_checkable

from ipcbridge.errors import BridgeError
from ipcbridge.fence import Lease, LeaseGate
from ipcbridge.manifest import Manifest

logger = logging.getLogger(__name__)


@runtime_checkable
class Endpoint(Protocol):
    """The control channel of one engine. Every method raises ``BridgeError`` if the engine is gone."""

    #: Short description for logs and summaries, e.g. ``"local-engine"`` or ``"vllm-llm"``.
    name: str

    def manifest(self) -> Manifest:
        """The engine's current export (handles, config, weight version)."""

    def pause(self, lease: Lease, wait: float) -> None:
        """Take the engine's pause for ``lease``: stop generation, wait for in-flight requests. Waits at most
        ``wait`` seconds for another lease; ``FenceError`` names the holder."""

    def renew(self, lease: Lease) -> None:
        """Extend ``lease`` by its length from now."""

    def resume(self, lease: Lease) -> int:
        """Drop caches computed with old weights, move the weight version forward, resume; the new version."""

    def cancel(self, lease: Lease) -> None:
        """Withdraw ``lease``'s pause request or release its pause (after an interrupted ``pause``)."""

    def close(self) -> None:
        """Release the endpoint's own resources (not the engine)."""


@runtime_checkable
class CanSample(Protocol):
    """An endpoint that generates: greedy tokens after ``prompt`` and the engine's logprob of each."""

    def sample(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]: ...


@runtime_checkable
class CanReceiveStream(Protocol):
    """An endpoint whose engine can receive streamed weights (``ipcbridge.stream``)."""

    def stream_init(self, stream_id: str, *, host: str, port: int, backend: str, timeout: float,
                    plan: Mapping[str, Any]) -> None:
        """Check ``plan`` against the engine's weights and keep it; join the trainer's group at ``host:port``
        as rank 1, replacing any previous stream; block until the trainer has joined too."""

    def stream_receive(self, stream_id: str, *, timeout: float) -> dict[str, Any]:
        """Receive one push of the plan given to ``stream_init`` into the engine's weights (engine paused);
        block until loaded. Refuse a ``stream_id`` that is not the current stream's."""

    def stream_close(self, stream_id: str) -> None:
        """Leave the group, if it is still ``stream_id``'s."""


# ---- leases kept in the trainer's process ------------------------------------------------------------

# Note [one gate per engine object]
#     Two bridges on one vLLM engine in one process must share a gate, or each would take "the" pause
#     and resume it under the other. Gates are keyed by the engine object (weakly: a gate lives as long
#     as its engine) or, for engines reached by URL, by the URL.
_GATES: weakref.WeakKeyDictionary[Any, LeaseGate] = weakref.WeakKeyDictionary()
_URL_GATES: dict[str, LeaseGate] = {}
_GATES_LOCK = threading.Lock()


class InProcessLeases:
    """Leases for an engine that has none of its own, kept in this process. See Note [the fence, per engine].

    Subclasses set ``gate_key`` (the engine object, or its URL) and implement :meth:`engine_pause` and
    :meth:`engine_resume`; the gate calls ``engine_resume`` on release and when a lease runs out.
    """

    name: str = "engine"
    gate_key: Any = None

    def engine_pause(self) -> None:
        """Stop the engine's generation and wait for in-flight requests (nothing to do for ``vllm.LLM``)."""
        raise NotImplementedError

    def engine_resume(self) -> int:
        """Drop stale KV, move the engine's weight version forward, resume generation; the new version."""
        raise NotImplementedError

    def _gate(self) -> LeaseGate:
        key = self.gate_key
        with _GATES_LOCK:
            gates: Any = _URL_GATES if isinstance(key, str) else _GATES
            gate = gates.get(key)
            if gate is None:
                gate = gates[key] = LeaseGate(_no_default_resume, name=f"the {self.name} engine")
            return gate

    def _resume_for_gate(self, reason: str) -> int:
        logger.debug("%s: resuming (%s)", self.name, reason)
        return self.engine_resume()

    def pause(self, lease: Lease, wait: float) -> None:
        gate = self._gate()
        # Each lease resumes through the endpoint that took it (which the lease keeps alive): the gate is
        # the engine's, and outlives any one bridge's endpoint.
        gate.acquire(lease, wait, resume=self._resume_for_gate)
        try:
            self.engine_pause()
        except BaseException:
            # The engine may be paused anyway (a timed-out request): resume it. ``cancel`` logs its own
            # errors, so the pause's error is the one the caller sees.
            gate.cancel(lease.id)
            raise

    def renew(self, lease: Lease) -> None:
        self._gate().renew(lease.id)

    def resume(self, lease: Lease) -> int:
        return self._gate().release(lease.id)

    def cancel(self, lease: Lease) -> None:
        self._gate().cancel(lease.id)


def _no_default_resume(reason: str) -> int:
    # Every lease of an in-process gate carries its endpoint's resume (InProcessLeases.pause).
    raise BridgeError(f"an in-process lease had no endpoint to resume through ({reason})")


class ManifestEndpoint(InProcessLeases):
    """A fixed manifest with no engine to pause: the fence is only the device synchronisation."""

    name = "manifest"

    def __init__(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._version = manifest.weight_version
        self.gate_key = self

    def manifest(self) -> Manifest:
        return self._manifest

    def engine_pause(self) -> None:
        pass

    def engine_resume(self) -> int:
        self._version += 1
        return self._version

    def close(self) -> None:
        pass


# ---- an engine on an event loop ----------------------------------------------------------------------


def engine_loop(engine: Any, loop: asyncio.AbstractEventLoop | None) -> asyncio.AbstractEventLoop:
    """The event loop an ``AsyncLLM`` runs on: ``loop``, its output handler's, or the running one."""
    if loop is None:
        handler = getattr(engine, "output_handler", None)
        if handler is not None:
            loop = handler.get_loop()
        else:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
    if loop is None:
        raise BridgeError(
            "this AsyncLLM is not bound to an event loop yet; create it inside a running loop "
            "(asyncio.run(main())) and call ipcbridge from another thread (`await asyncio.to_thread("
            "ipcbridge.connect, engine)`, likewise ipcbridge.stream), or pass loop="
        )
    return loop


class OnEventLoop:
    """Calls into an engine that lives on an asyncio loop of this process (``AsyncLLM``) from synchronous
    trainer code, on another thread. See Note [AsyncLLM from synchronous code] in
    :mod:`ipcbridge.vllm.endpoints`. Subclasses set ``loop`` (:func:`engine_loop`) and ``timeout``."""

    loop: asyncio.AbstractEventLoop
    timeout: float | None

    def _check_thread(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            raise BridgeError(
                "ipcbridge was called on the AsyncLLM's own event-loop thread, where waiting would deadlock; "
                "call it from a worker thread: `await asyncio.to_thread(ipcbridge.connect, engine)` (likewise "
                "ipcbridge.stream) and `await asyncio.to_thread(train_step)`"
            )

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """``coro``'s result, run on the engine's loop; ``BridgeError`` if it cannot run there or is late."""
        try:
            self._check_thread()
            if self.loop.is_closed() or not self.loop.is_running():
                raise BridgeError("the AsyncLLM's event loop is not running; the engine has stopped")
        except BridgeError:
            coro.close()  # never awaited: close it, or Python warns at garbage collection
            raise
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise BridgeError(f"AsyncLLM did not answer within {self.timeout}s") from None


# ---- finding an endpoint -----------------------------------------------------------------------------

#: Endpoint factories by target kind, as "module:attribute" strings (imported on first use).
ENDPOINTS: dict[str, str] = {
    "http": "ipcbridge.vllm.http:HttpEndpoint",
    "vllm": "ipcbridge.vllm.inprocess:endpoint_for",  # in-process LLM (TRL colocate), else cross-process
}


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def resolve_endpoint(target: Any, kv_reset: str | None = None) -> Endpoint:
    """The endpoint for ``target``: a Manifest, a LocalEngine, a vLLM LLM/AsyncLLM, an http(s) URL, or an
    object that is an :class:`Endpoint` itself. ``kv_reset`` is for the vLLM endpoints that ``target`` names
    (Note [stale KV: reset or salt] in :mod:`ipcbridge.vllm.base`); an endpoint built elsewhere keeps its own."""
    options = {} if kv_reset is None else {"kv_reset": kv_reset}
    if isinstance(target, str) and target.startswith(("http://", "https://")):
        return _load(ENDPOINTS["http"])(target, **options)
    if type(target).__module__.split(".")[0] == "vllm":
        return _load(ENDPOINTS["vllm"])(target, **options)
    if options:
        raise BridgeError(
            f"kv_reset={kv_reset!r} applies to a vllm.LLM, an AsyncLLM or a `vllm serve` URL, not to a "
            f"{type(target).__name__}; leave it out (an engine wrapper such as VllmEngine takes kv_reset itself)"
        )
    if isinstance(target, Manifest):
        return ManifestEndpoint(target)
    hook = getattr(target, "ipcbridge_endpoint", None)
    if callable(hook):
        return hook()
    if isinstance(target, Endpoint):
        return target
    raise TypeError(
        f"connect() does not know how to reach a {type(target).__module__}.{type(target).__name__}; pass a "
        "LocalEngine, a vllm.LLM/AsyncLLM started with worker_extension_cls='ipcbridge.vllm.WorkerExtension', "
        "an http://host:port of `vllm serve`, or a Manifest"
    )
