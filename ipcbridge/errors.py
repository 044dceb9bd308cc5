"""Errors users can catch.

Every message names what was wrong and how to fix it. ``ManifestError`` and ``MappingError`` are also
``ValueError`` (bad input); ``BridgeError`` is a ``RuntimeError`` (a live engine or attachment failed).

Note [error types cross processes]
    An error raised in the engine process (a ``MappingError`` for a config it cannot map, a
    ``FenceError`` for a pause held by someone else) reaches the trainer as the *same* type: the RPC
    envelope (:mod:`ipcbridge.wire`) carries the class name and :func:`error_type` turns it back into
    the class. Only the names below travel; any other exception arrives as the caller's default type
    (``EngineError`` for the embedded engine, ``BridgeError`` for vLLM), so a peer can never make the
    trainer instantiate an arbitrary class.
"""

from __future__ import annotations


class IpcBridgeError(Exception):
    """Base class of every error ipcbridge raises on purpose."""


class ManifestError(IpcBridgeError, ValueError):
    """A manifest is malformed, of an unknown version, or describes tensors outside its storages."""


class MappingError(IpcBridgeError, ValueError):
    """A state dict or config does not fit an architecture's HF <-> vLLM <-> Meta name/layout table."""


class BridgeError(IpcBridgeError, RuntimeError):
    """Attaching to, fencing or talking to an engine failed (engine gone, hung, refused, or not shareable)."""


class FenceError(BridgeError):
    """A fence could not be taken or was broken: the engine is paused by another holder, ``update()`` was
    nested, or a lease expired before its holder resumed the engine."""


class EngineError(BridgeError):
    """The embedded engine process died, timed out, or rejected a request."""


class RequestError(EngineError, ValueError):
    """A request's arguments are wrong (shape, type or range): raised in the caller's process before anything is
    sent, and, for the engine's own check of the same request, carried back as the same type."""


class PrecisionError(IpcBridgeError, ValueError):
    """``ipcbridge.optim.master_weights`` was given something it cannot use: an unknown mode, an optimizer
    it cannot wrap, or a state dict of another mode or shape."""


#: The error classes whose names may cross a process boundary. See Note [error types cross processes].
_WIRE_TYPES: dict[str, type[IpcBridgeError]] = {
    cls.__name__: cls
    for cls in (IpcBridgeError, ManifestError, MappingError, BridgeError, FenceError, EngineError, RequestError)
}


def error_type(name: object, default: type[IpcBridgeError]) -> type[IpcBridgeError]:
    """The ipcbridge error class called ``name``, or ``default`` for any other name."""
    return _WIRE_TYPES.get(name, default) if isinstance(name, str) else default


def reset_failed(where: str) -> BridgeError:
    """The error for a prefix-cache reset that vLLM reports as failed, said once for every endpoint and
    control: the blocks computed with the old weights are still there to be hit."""
    return BridgeError(
        f"{where}: reset_prefix_cache reported failure (KV blocks still held, e.g. by requests running during "
        "the fence), so KV computed with the old weights could be reused. Make sure nothing generates during "
        "bridge.update(), or salt every request (kv_reset='salted')"
    )
