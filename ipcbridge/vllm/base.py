"""What every vLLM endpoint shares: asking the worker extension, and the fence's engine half.

The three vLLM endpoints (``vllm.LLM``, ``AsyncLLM``, ``vllm serve``) differ only in how a call travels:
``rpc`` (``collective_rpc`` in-process, ``POST /collective_rpc`` over HTTP) and the engine's pause, resume
and prefix-cache reset. Everything else is here, once: the single-worker check, decoding replies, the
manifest, the weight version, and the order of the resume.

vLLM has no lease of its own, so the leases are kept in the trainer's process
(:class:`~ipcbridge.endpoints.InProcessLeases`, keyed by the engine object or URL: two bridges on one
engine share one pause). See Note [the fence, per engine] in :mod:`ipcbridge.fence`.

Note [resume never leaves the engine paused]
    ``engine_resume`` invalidates the KV computed with the old weights (Note [stale KV: reset or salt]),
    then publishes the next weight version (Note [the engine owns the weight version] in
    :mod:`ipcbridge.vllm.extension`, Note [an in-process engine's version is counted here]) and hands it to
    vLLM's own weight version where the release has one, then resumes generation. The publish runs even if
    the reset failed (the weights did change), and the resume runs in a ``finally``: if the reset or the publish fails (a timeout, a worker without the
    extension, a reset that reports ``success: false``), the error reaches the trainer but the engine does
    not stay paused.

Note [stale KV: reset or salt]
    A prefix-cache hit reuses KV blocks computed with whatever weights were served when they were filled,
    so after an update they must not be hit again. Two ways, chosen by ``kv_reset``:

    * ``"always"`` (the default): ``reset_prefix_cache`` at every fence. Correct for any request, salted
      or not, but vLLM walks every KV block in Python: ~35 ms for 637k blocks (a 0.5B model at
      ``gpu_memory_utilization=0.85``), growing with the KV cache, not the model.
    * ``"salted"``: no reset. vLLM hashes a prompt's ``cache_salt`` into its first block's hash (so into
      every later block's, which chain), and ipcbridge salts the requests *it* submits with
      :meth:`VllmEndpoint.cache_salt`, which changes at every fence: a request can only hit blocks filled
      under the same weights. Stale blocks are never hit again and age out of vLLM's LRU. The fence then
      costs the same whatever the KV size. Requests submitted elsewhere must carry the same salt (pass
      ``cache_salt=endpoint.cache_salt()`` in the prompt, or the ``cache_salt`` field of a ``vllm serve``
      request); an unsalted request could hit stale blocks, so ``"salted"`` is an explicit opt-in.

    An engine without prefix caching (``enable_prefix_caching=False``) reuses no KV across requests: no
    reset in either mode. The salt is ``ipcbridge-<nonce>-<epoch>``: a random nonce per engine per trainer
    process, and an epoch that every fence through any endpoint of this process on that engine moves
    forward (so two bridges on one engine agree on it). Fences by *another* trainer process are not seen,
    so use ``"salted"`` only where this process is the engine's one writer.

Note [an in-process engine's version is counted here]
    A ``vllm.LLM`` or ``AsyncLLM`` is an object of the trainer's process: its EngineCore is a child that dies
    with it, and no other process can reach its worker. So for these endpoints (``counts_version_here``) a
    fence counts the weight version in this process, in the engine's :class:`EngineRecord`, instead of
    asking the worker by RPC. That RPC was most of a salted fence: 0.8-0.9 ms of 1.2-2.1 ms on an H200
    (vLLM 0.26.0, 2026-11-30). Every endpoint of this process on the engine counts through the one record,
    which keeps what Note [the engine owns the weight version] promises (no version published twice, a
    reconnecting bridge continues the sequence). The worker is told before any reply that carries its
    version (:meth:`VllmEndpoint.tell_worker_version`: a new bridge's manifest, the stream layout,
    :meth:`VllmEndpoint.engine_weight_version`, :meth:`VllmEndpoint.info`), hears every such reply
    (:meth:`VllmEndpoint.heard_version`), and never moves back. The record starts from the first version the worker reports; until then the worker
    counts. vLLM's own version (0.27+) is still set at every fence, since its outputs carry it. ``vllm
    serve`` is reached by URL from any process, so there the worker counts every fence.
"""

from __future__ import annotations

import logging
import secrets
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from ipcbridge.endpoints import InProcessLeases
from ipcbridge.errors import BridgeError, reset_failed
from ipcbridge.manifest import Manifest
from ipcbridge.vllm.features import VllmFeatures
from ipcbridge.vllm.rpc import decode_reply

logger = logging.getLogger(__name__)

#: The ways a fence invalidates stale KV (Note [stale KV: reset or salt]).
KV_RESET_MODES = ("always", "salted")

# What this process knows of each engine, keyed as the lease gates are: by the engine object (weakly) or
# by its URL. See EngineRecord.
_RECORDS_LOCK = threading.Lock()


@dataclass
class EngineRecord:
    """One engine, as every endpoint of this process on it sees it; its methods hold ``_RECORDS_LOCK``.

    ``nonce`` and ``epoch`` make the cache salt (Note [stale KV: reset or salt]); ``version`` is the weight
    version last published through this process and ``synced`` the last one the worker heard of (Note [an
    in-process engine's version is counted here]; ``None``: not known yet).
    """

    nonce: str
    epoch: int = 0
    version: int | None = None
    synced: int | None = None

    def next_epoch(self) -> None:
        with _RECORDS_LOCK:
            self.epoch += 1

    def count(self) -> int | None:
        """The next version, counted here; ``None`` while the worker's is not known (the worker counts it)."""
        with _RECORDS_LOCK:
            if self.version is None:
                return None
            self.version += 1
            return self.version

    def heard(self, version: int) -> None:
        """The worker answered with ``version``: it knows every version up to it."""
        with _RECORDS_LOCK:
            self.synced = version if self.synced is None else max(self.synced, version)
            self.version = version if self.version is None else max(self.version, version)

    def unsynced(self) -> int | None:
        """The version counted here that the worker has not heard of, if any."""
        with _RECORDS_LOCK:
            return None if self.version is None or self.version == self.synced else self.version


_RECORDS: weakref.WeakKeyDictionary[Any, EngineRecord] = weakref.WeakKeyDictionary()
_URL_RECORDS: dict[str, EngineRecord] = {}


def engine_record(key: Any) -> EngineRecord:
    """The record of the engine ``key`` names (an engine object or a URL), made on first use."""
    with _RECORDS_LOCK:
        table: Any = _URL_RECORDS if isinstance(key, str) else _RECORDS
        rec = table.get(key)
        if rec is None:
            rec = table[key] = EngineRecord(secrets.token_hex(4))
        return rec


def check_kv_reset(kv_reset: str) -> str:
    """``kv_reset`` if it is one of :data:`KV_RESET_MODES`; ``BridgeError`` naming them otherwise."""
    if kv_reset not in KV_RESET_MODES:
        raise BridgeError(
            f"kv_reset must be one of {KV_RESET_MODES}, got {kv_reset!r}: 'always' resets vLLM's prefix cache "
            "at every fence, 'salted' relies on every request carrying cache_salt=endpoint.cache_salt()"
        )
    return kv_reset


class VllmEndpoint(InProcessLeases):
    """The control channel of one vLLM engine whose worker has :class:`~ipcbridge.vllm.WorkerExtension`.

    Subclasses set ``name``, ``where`` and ``gate_key`` and implement :meth:`rpc` (one ``collective_rpc``,
    returning the list of per-worker results), :meth:`engine_pause`, :meth:`reset_prefix_cache` and
    :meth:`resume_generation`. The manifest lends the worker's memory: it stays valid while the engine runs
    and keeps its weights (see :class:`~ipcbridge.vllm.extension.WorkerExtension`).
    """

    name = "vllm"
    #: Who answers, for error messages (e.g. ``"the vLLM worker"``, ``"vllm serve at http://..."``).
    where = "the vLLM worker"
    #: The weight version this endpoint last saw: the manifest's, then each resume's. The worker's counter
    #: is the truth (:meth:`engine_weight_version`); another bridge's fences move it too.
    weight_version: int = 0
    #: What this engine's vLLM offers (:mod:`ipcbridge.vllm.features`); subclasses probe it.
    features: VllmFeatures = VllmFeatures()
    #: How a fence invalidates stale KV (Note [stale KV: reset or salt]).
    kv_reset: str = "always"
    #: Whether fences count the weight version in this process, not by RPC (Note [an in-process engine's
    #: version is counted here]): only for engines that are objects of this process.
    counts_version_here: bool = False

    # -- what subclasses provide ---------------------------------------------------------------------

    def collective_rpc(self, method: str, *args: Any) -> Any:
        """Call ``method`` on every worker; their raw results (a list, one JSON string each)."""
        raise NotImplementedError

    def reset_prefix_cache(self) -> bool | None:
        """Drop the engine's prefix cache; whether it succeeded (``None``: the engine does not say)."""
        raise NotImplementedError

    def set_engine_weight_version(self, version: str) -> None:
        """vLLM's own ``update_weight_version`` (called only where ``features.engine_weight_version``)."""
        raise NotImplementedError

    def resume_generation(self) -> None:
        """Let generation continue after :meth:`engine_pause`."""
        raise NotImplementedError

    # -- asking the worker -----------------------------------------------------------------------------

    def _single(self, results: Any, method: str) -> Any:
        """The value of the one worker's reply; ``BridgeError`` unless exactly one worker answered."""
        if not isinstance(results, list) or len(results) != 1:
            n = len(results) if isinstance(results, list) else results
            raise BridgeError(
                f"collective_rpc({method!r}) answered from {n} workers; ipcbridge attaches to one worker "
                "(tensor_parallel_size=1, pipeline_parallel_size=1)"
            )
        return decode_reply(results[0], f"{self.where} ({method})")

    def rpc(self, method: str, *args: Any) -> Any:
        """Call one ``ipcbridge_*`` method of the worker; its value, or its error raised as its own type."""
        return self._single(self.collective_rpc(method, *args), method)

    def _version(self, method: str, *args: Any) -> int:
        v = self.rpc(method, *args)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise BridgeError(f"{self.where} answered {method} with {v!r}, not a weight version (an int >= 0)")
        self.heard_version(v)
        return v

    def manifest(self) -> Manifest:
        """The worker's export: handles of the served weights, the HF config, and the weight version."""
        self.tell_worker_version()  # the manifest carries the worker's version
        m = Manifest.from_dict(self.rpc("ipcbridge_manifest"))
        self.heard_version(m.weight_version)
        self.weight_version = m.weight_version
        return m

    def engine_weight_version(self) -> int:
        """The weight version the worker holds (asks the worker, after telling it any version counted here)."""
        behind = self._behind()
        return self._version("ipcbridge_weight_version", *(() if behind is None else (behind,)))

    def publish_weight_version(self) -> int:
        """Move the engine's weight version forward by one, and tell vLLM where it keeps one; the new version.

        Counted here where Note [an in-process engine's version is counted here] allows, else by the worker.
        vLLM's own version (0.27+) is a string it attaches to outputs (``weight_versions``, 0.32+); it gets the
        same number, so both name the same weights.
        """
        rec = self._counted()
        version = rec.count() if rec is not None else None
        if version is None:
            version = self._version("ipcbridge_publish_weight_version")
        self.weight_version = version
        if self.features.engine_weight_version:
            self.set_engine_weight_version(str(version))
        return version

    # -- the version counted in this process (Note [an in-process engine's version is counted here]) ------

    def _counted(self) -> EngineRecord | None:
        """The engine's record where this process counts its versions, else ``None``."""
        return engine_record(self.gate_key) if self.counts_version_here else None

    def _behind(self) -> int | None:
        rec = self._counted()
        return None if rec is None else rec.unsynced()

    def heard_version(self, version: int) -> None:
        """A worker reply carried its weight version ``version`` (any ``ipcbridge_*`` reply that does)."""
        rec = self._counted()
        if rec is not None:
            rec.heard(version)

    def tell_worker_version(self) -> None:
        """Before a worker reply that carries its version: tell it any version counted here (one RPC, or none
        when it is up to date)."""
        if self._behind() is not None:
            self.engine_weight_version()

    # -- stale KV (Note [stale KV: reset or salt]) -------------------------------------------------------

    def needs_reset(self) -> bool:
        """Whether a fence must reset the prefix cache."""
        return self.features.prefix_caching and self.kv_reset == "always"

    def cache_salt(self) -> str:
        """The ``cache_salt`` for a request submitted now: it changes at every fence on this engine."""
        rec = engine_record(self.gate_key)
        return f"ipcbridge-{rec.nonce}-{rec.epoch}"

    def _next_salt_epoch(self) -> None:
        engine_record(self.gate_key).next_epoch()

    def drop_stale_kv(self) -> None:
        """Move the salt on, and reset the prefix cache if :meth:`needs_reset`; ``BridgeError`` if vLLM
        reports that the reset failed (stale blocks would stay hit-able)."""
        self._next_salt_epoch()
        if not self.needs_reset():
            return
        if self.reset_prefix_cache() is False:
            raise reset_failed(self.where)

    def info(self) -> dict[str, Any]:
        """The worker's process and memory facts (``WorkerExtension.ipcbridge_info``)."""
        self.tell_worker_version()
        info = self.rpc("ipcbridge_info")
        if not isinstance(info, dict):
            raise BridgeError(f"{self.where} answered ipcbridge_info with {str(info)[:200]!r}, not a dict")
        return info

    # -- the fence's engine half -----------------------------------------------------------------------

    def engine_resume(self) -> int:
        """Reset the prefix cache, publish the next version, resume; the new version. Note [resume never
        leaves the engine paused]."""
        try:
            try:
                self.drop_stale_kv()
            finally:  # the weights did change: move the version even if the reset failed
                version = self.publish_weight_version()
        finally:
            self.resume_generation()
        logger.debug("%s: resumed at weight version %d", self.name, version)
        return version

    def close(self) -> None:
        """Nothing to release: the endpoint holds no resources of its own (the engine keeps running)."""
