"""The ``ipcbridge_*`` RPC across vLLM's ``collective_rpc``: one JSON string each way, both sides here.

Note [replies cross vLLM's msgpack channel]
    ``collective_rpc`` results travel from the worker to the caller over msgpack, and ``/collective_rpc``
    turns anything but dicts and lists into ``str``. Anything else would need pickle, which vLLM refuses
    without ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``. So every ``ipcbridge_*`` method returns *one JSON
    string*, the envelope of :mod:`ipcbridge.wire` (Note [the envelope]), and takes only ``str``/``int``
    arguments (``/collective_rpc`` passes strings; :func:`parse_int` and :func:`parse_float` read both).
    Errors are *returned*, not raised: the trainer then raises our message (cause and fix), as the same
    ipcbridge type (a ``MappingError`` in the worker is a ``MappingError`` in the trainer), rather than a
    worker traceback wrapped by vLLM.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar

from ipcbridge import wire
from ipcbridge.errors import BridgeError
from ipcbridge.manifest import MAX_MANIFEST_BYTES

logger = logging.getLogger(__name__)

#: The qualified name to pass as ``worker_extension_cls`` / ``--worker-extension-cls``.
EXTENSION_QUALNAME = "ipcbridge.vllm.WorkerExtension"

#: A worker's reply may carry a whole manifest (an 8B model's is ~120 KB; the manifest's own cap is larger).
MAX_REPLY_BYTES = MAX_MANIFEST_BYTES + (1 << 20)

_HINT = (
    f"is worker_extension_cls {EXTENSION_QUALNAME!r} (or a subclass) set, and the same ipcbridge version "
    "installed in the engine?"
)

F = TypeVar("F", bound=Callable[..., Any])


# ---- the worker side ---------------------------------------------------------------------------------


def worker_method(fn: F) -> F:
    """Make an ``ipcbridge_*`` worker method return its value, or its error, as one JSON reply string."""

    @functools.wraps(fn)
    def method(*args: Any, **kwargs: Any) -> str:
        try:
            return json.dumps(wire.reply_ok(fn(*args, **kwargs)), separators=(",", ":"))
        except Exception as e:  # returned, not raised: Note [replies cross vLLM's msgpack channel]
            logger.warning("%s failed: %s", fn.__name__, e)
            return json.dumps(wire.reply_error(e), separators=(",", ":"))

    return method  # type: ignore[return-value]


def parse_int(value: int | str, what: str, minimum: int = 0) -> int:
    """An int argument from ``collective_rpc`` (an int, or a decimal string over HTTP), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BridgeError(f"{what} must be an int or a decimal string, got {value!r}")
    try:
        v = int(value)
    except ValueError:
        raise BridgeError(f"{what} must be an int or a decimal string, got {value!r}") from None
    if v < minimum:
        raise BridgeError(f"{what} must be >= {minimum}, got {v}")
    return v


def parse_float(value: float | int | str, what: str) -> float:
    """A finite float argument from ``collective_rpc`` (a number, or its decimal string over HTTP)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BridgeError(f"{what} must be a number or a decimal string, got {value!r}")
    try:
        v = float(value)
    except ValueError:
        raise BridgeError(f"{what} must be a number or a decimal string, got {value!r}") from None
    if not math.isfinite(v):
        raise BridgeError(f"{what} must be finite, got {v}")
    return v


# ---- the trainer side --------------------------------------------------------------------------------


def decode_reply(text: Any, where: str) -> Any:
    """The value of one worker reply, or raise the worker's error as its own ipcbridge type.

    ``text`` is what ``collective_rpc`` returned for one worker; anything but a JSON envelope (no
    extension, another ipcbridge version, a worker that returned something else) is a ``BridgeError``
    naming ``where`` and the fix.
    """
    if not isinstance(text, (str, bytes)):
        raise BridgeError(f"{where} returned a {type(text).__name__}, not an ipcbridge reply; {_HINT}")
    d = wire.parse_json(text, f"{where} returned what is not an ipcbridge reply", max_bytes=MAX_REPLY_BYTES,
                        error=BridgeError, hint=f"; {_HINT}")
    return wire.unwrap(d, where, BridgeError)
