"""What the vLLM in front of us can do, probed from its objects (never from its version string).

ipcbridge supports ``vllm>=0.25.1,<0.34``. The releases differ in what the fence can use (the table with
how each row was verified is in ``docs/vllm.md``):

============  ==========================================================================================
release       difference the endpoints act on
============  ==========================================================================================
0.26          ``POST /reset_prefix_cache`` answers ``{"success": bool}`` (``LLM``/``AsyncLLM`` always
              returned the bool): a failed reset is an error, not stale KV served silently
0.27          an engine weight version: ``update_weight_version(str)`` / ``get_weight_version()`` on
              ``LLM`` and ``AsyncLLM``, ``POST /update_weight_version`` and ``GET /weight_info``
0.32          ``CompletionOutput.weight_versions`` (per-token spans of that version)
0.33          ``pause_generation(mode="wait")`` *rejects* new requests until resume (HTTP 503,
              retryable); the engine core's pause utility is ``pause_generation``
============  ==========================================================================================

Note [probe features, not versions]
    Backports, release candidates and forks make version strings lie, so each feature is read from the
    object that would provide it (``hasattr``, a dataclass field, a route that answers). :class:`VllmFeatures`
    is a frozen, self-validating record with a pure constructor (:meth:`VllmFeatures.probe`) that takes the
    engine object and the two vLLM classes it looks at, so CPU fakes of each release drive it without vLLM.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from ipcbridge.errors import BridgeError

logger = logging.getLogger(__name__)

#: Names of the engine core client's pause coroutine, newest first: 0.33 added ``pause_generation_async``
#: (the one that rejects new requests in abort/wait mode, as ``AsyncLLM.pause_generation`` does there).
CORE_PAUSE_METHODS = ("pause_generation_async", "pause_scheduler_async")


@dataclass(frozen=True)
class VllmFeatures:
    """What one engine offers the fence. Built by :meth:`probe` (in-process engines) or by the HTTP endpoint
    from the routes that answer; every field has the value of the oldest supported release (0.25.1)."""

    #: ``update_weight_version(str)`` exists on the engine (0.27+): the bridge's version is published there
    #: too, so vLLM's own ``get_weight_version`` and (0.32+) each output's ``weight_versions`` carry it.
    engine_weight_version: bool = False
    #: ``CompletionOutput`` has a ``weight_versions`` field (0.32+).
    output_weight_versions: bool = False
    #: A pause in "abort"/"wait" mode rejects new requests until resume (0.33+) instead of queueing them.
    pause_rejects_new: bool = False
    #: The engine core client's pause coroutine (:data:`CORE_PAUSE_METHODS`), or ``""`` if none is found
    #: (then the public ``pause_generation`` is used, with its 20 ms settle sleep).
    core_pause: str = ""
    #: Prompts take a ``cache_salt`` that vLLM hashes into their first KV block (0.25.1 has it).
    cache_salt: bool = True
    #: The engine caches prefixes at all (``cache_config.enable_prefix_caching``): if not, no KV is reused
    #: across requests and the fence needs no reset.
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "core_pause":
                if v not in ("", *CORE_PAUSE_METHODS):
                    raise BridgeError(f"VllmFeatures.core_pause must be one of {CORE_PAUSE_METHODS} or '', got {v!r}")
            elif not isinstance(v, bool):
                raise BridgeError(f"VllmFeatures.{f.name} must be a bool, got {v!r}")
        if self.pause_rejects_new and self.core_pause == "pause_scheduler_async":
            raise BridgeError("VllmFeatures: a pause that rejects new requests is the core's pause_generation_async")

    @classmethod
    def probe(cls, engine: Any, vllm_config: Any, completion_output_cls: Any = None,
              prompt_cls: Any = None) -> VllmFeatures:
        """The features of ``engine`` (a ``vllm.LLM`` or ``AsyncLLM``, or a fake of either).

        ``completion_output_cls`` is ``vllm.outputs.CompletionOutput`` and ``prompt_cls``
        ``vllm.inputs.TokensPrompt`` (:func:`vllm_classes` imports them); ``None`` leaves the 0.25.1 value.
        """
        core = getattr(engine, "engine_core", None)
        core_pause = next((m for m in CORE_PAUSE_METHODS if callable(getattr(core, m, None))), "")
        return cls(
            engine_weight_version=callable(getattr(engine, "update_weight_version", None)),
            output_weight_versions=_has_field(completion_output_cls, "weight_versions", default=False),
            pause_rejects_new=core_pause == "pause_generation_async",
            core_pause=core_pause,
            cache_salt=_has_field(prompt_cls, "cache_salt", default=True),
            prefix_caching=prefix_caching(vllm_config),
        )

    def describe(self) -> str:
        """One line for logs and benchmark records."""
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))


def _has_field(cls: Any, name: str, default: bool) -> bool:
    """Whether ``cls`` (a dataclass, a TypedDict or a plain class) declares ``name``; ``default`` for ``None``."""
    if cls is None:
        return default
    if dataclasses.is_dataclass(cls):
        return any(f.name == name for f in dataclasses.fields(cls))
    annotations: dict[str, Any] = {}
    for klass in reversed(getattr(cls, "__mro__", (cls,))):
        annotations.update(getattr(klass, "__annotations__", {}) or {})
    return name in annotations or hasattr(cls, name)


def prefix_caching(vllm_config: Any) -> bool:
    """``cache_config.enable_prefix_caching`` of an engine config; ``True`` (reset, to be safe) if unknown."""
    value = getattr(getattr(vllm_config, "cache_config", None), "enable_prefix_caching", None)
    return True if value is None else bool(value)


def vllm_classes() -> tuple[Any, Any]:
    """(``CompletionOutput``, ``TokensPrompt``) of the installed vLLM, for :meth:`VllmFeatures.probe`;
    ``(None, None)`` where vLLM is not installed (then the engine is a stand-in, and 0.25.1 is assumed)."""
    try:
        from vllm.inputs import TokensPrompt
        from vllm.outputs import CompletionOutput
    except ImportError:
        return None, None
    return CompletionOutput, TokensPrompt
