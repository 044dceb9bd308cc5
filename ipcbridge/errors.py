"""Errors users can catch.

Every message names what was wrong and how to fix it. ``ManifestError`` and ``MappingError`` are also
``ValueError`` (bad input); ``BridgeError`` is a ``RuntimeError`` (a live engine or attachment failed).
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


class EngineError(BridgeError):
    """The embedded engine process died, timed out, or rejected a request."""
