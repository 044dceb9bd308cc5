"""What every vLLM endpoint shares: asking the worker extension, and the fence's engine half.

The three vLLM endpoints (``vllm.LLM``, ``AsyncLLM``, ``vllm serve``) differ only in how a call travels:
``rpc`` (``collective_rpc`` in-process, ``POST /collective_rpc`` over HTTP) and the engine's pause, resume
and prefix-cache reset. Everything else is here, once: the single-worker check, decoding replies, the
manifest, the weight version, and the order of the resume.

vLLM has no lease of its own, so the leases are kept in the trainer's process
(:class:`~ipcbridge.endpoints.InProcessLeases`, keyed by the engine object or URL: two bridges on one
engine share one pause). See Note [the fence, per engine] in :mod:`ipcbridge.fence`.

Note [resume never leaves the engine paused]
    ``engine_resume`` drops the prefix cache (KV blocks computed with the old weights must not be reused
    by the next prompt with the same prefix), then asks the worker to publish the next weight version
    (Note [the engine owns the weight version] in :mod:`ipcbridge.vllm.extension`), then resumes
    generation in a ``finally``: if the reset or the publish fails (a timeout, a worker without the
    extension), the error reaches the trainer but the engine does not stay paused.
"""

from __future__ import annotations

import logging
from typing import Any

from ipcbridge.endpoints import InProcessLeases
from ipcbridge.errors import BridgeError
from ipcbridge.manifest import Manifest
from ipcbridge.vllm.rpc import decode_reply

logger = logging.getLogger(__name__)


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

    # -- what subclasses provide ---------------------------------------------------------------------

    def collective_rpc(self, method: str, *args: Any) -> Any:
        """Call ``method`` on every worker; their raw results (a list, one JSON string each)."""
        raise NotImplementedError

    def reset_prefix_cache(self) -> None:
        """Drop the engine's prefix cache (KV blocks computed with the old weights)."""
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

    def _version(self, method: str) -> int:
        v = self.rpc(method)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise BridgeError(f"{self.where} answered {method} with {v!r}, not a weight version (an int >= 0)")
        return v

    def manifest(self) -> Manifest:
        """The worker's export: handles of the served weights, the HF config, and the weight version."""
        m = Manifest.from_dict(self.rpc("ipcbridge_manifest"))
        self.weight_version = m.weight_version
        return m

    def engine_weight_version(self) -> int:
        """The weight version the worker holds (asks the worker)."""
        return self._version("ipcbridge_weight_version")

    def publish_weight_version(self) -> int:
        """Move the worker's weight version forward by one; the new version."""
        self.weight_version = self._version("ipcbridge_publish_weight_version")
        return self.weight_version

    def info(self) -> dict[str, Any]:
        """The worker's process and memory facts (``WorkerExtension.ipcbridge_info``)."""
        info = self.rpc("ipcbridge_info")
        if not isinstance(info, dict):
            raise BridgeError(f"{self.where} answered ipcbridge_info with {str(info)[:200]!r}, not a dict")
        return info

    # -- the fence's engine half -----------------------------------------------------------------------

    def engine_resume(self) -> int:
        """Reset the prefix cache, publish the next version, resume; the new version. Note [resume never
        leaves the engine paused]."""
        try:
            self.reset_prefix_cache()
            version = self.publish_weight_version()
        finally:
            self.resume_generation()
        logger.debug("%s: resumed at weight version %d", self.name, version)
        return version

    def close(self) -> None:
        """Nothing to release: the endpoint holds no resources of its own (the engine keeps running)."""
