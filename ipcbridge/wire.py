"""What crosses a process boundary: one validation kit, and one RPC envelope.

Everything that arrives from another process (a manifest, a stream plan, a reply from the engine or a vLLM
worker) is checked here, field by field, before it is used; each check names the dotted path of the field
so an error says exactly which one was wrong. Nothing is ever unpickled.

Note [the envelope]
    Every RPC answer, on the embedded engine's control socket and from vLLM's ``collective_rpc``, is one
    JSON object: ``{"format": "ipcbridge.reply", "ok": true, "result": ...}`` or ``{"format":
    "ipcbridge.reply", "ok": false, "error": "...", "error_type": "MappingError"}``. :func:`unwrap` returns
    the result or raises the error as the same ipcbridge type (Note [error types cross processes] in
    :mod:`ipcbridge.errors`), so ``except ipcbridge.MappingError`` works whichever process raised it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ipcbridge.errors import IpcBridgeError, ManifestError, error_type

REPLY_FORMAT = "ipcbridge.reply"

#: dtype names that may cross a process (``str(torch.bfloat16) == "torch.bfloat16"`` minus the prefix).
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool",
        "float8_e4m3fn", "float8_e5m2",
    )
    if hasattr(torch, name)
}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ManifestError(f"dtype {dtype} cannot be exported; supported: {', '.join(DTYPES)}")
    return name


# ---- the validation kit ------------------------------------------------------------------------------


def _type_names(types: type | tuple[type, ...]) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in ts)


def check_type(value: Any, types: type | tuple[type, ...], where: str) -> Any:
    # bool is an int subclass; a manifest that says "shape": [true] is malformed, not shape [1].
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ManifestError(f"{where}: expected {_type_names(types)}, got bool {value!r}")
    if not isinstance(value, types):
        raise ManifestError(f"{where}: expected {_type_names(types)}, got {type(value).__name__} {value!r:.80}")
    return value


def check_int(value: Any, where: str, minimum: int | None = 0) -> int:
    check_type(value, int, where)
    if minimum is not None and value < minimum:
        raise ManifestError(f"{where}: must be >= {minimum}, got {value}")
    return value


def check_keys(d: Any, required: set[str], optional: set[str], where: str) -> Mapping[str, Any]:
    check_type(d, Mapping, where)
    missing = required - d.keys()
    extra = d.keys() - required - optional
    if missing:
        raise ManifestError(f"{where}: missing field(s) {sorted(missing)}")
    if extra:
        raise ManifestError(f"{where}: unknown field(s) {sorted(extra)}; was it written by a newer ipcbridge?")
    return d


def check_format(d: Any, fmt: str, version: int, what: str) -> Mapping[str, Any]:
    """``d`` is a mapping whose ``format`` is ``fmt`` and whose ``format_version`` is ``version``."""
    check_type(d, Mapping, what)
    if d.get("format") != fmt:
        raise ManifestError(f"{what}.format: expected {fmt!r}, got {d.get('format')!r}; this is not an ipcbridge {what}")
    check_version(d.get("format_version"), version, what)
    return d


def check_version(got: Any, version: int, what: str) -> None:
    if got != version:
        raise ManifestError(
            f"{what}.format_version: {got!r} is not supported (this ipcbridge reads {version}); use the same "
            "ipcbridge version in the engine and the trainer"
        )


def check_name(name: Any, where: str) -> str:
    check_type(name, str, f"{where}.name")
    if not name:
        raise ManifestError(f"{where}: a tensor name must be a non-empty string")
    return name


def check_dtype(dtype: Any, where: str) -> torch.dtype:
    check_type(dtype, str, where)
    if dtype not in DTYPES:
        raise ManifestError(f"{where}: unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def check_dims(dims: Any, where: str) -> tuple[int, ...]:
    """A tuple of non-negative ints (a shape or a stride)."""
    check_type(dims, tuple, where)
    for i, s in enumerate(dims):
        check_int(s, f"{where}[{i}]")
    return dims


def check_tensor(name: Any, dtype: Any, shape: Any, nbytes: Any, where: str) -> None:
    """The fields every tensor description shares: a name, a known dtype, a shape, and its byte count."""
    check_name(name, where)
    torch_dtype = check_dtype(dtype, f"{where}.dtype")
    check_dims(shape, f"{where}.shape")
    check_int(nbytes, f"{where}.nbytes")
    expected = math.prod(shape) * torch_dtype.itemsize
    if nbytes != expected:
        raise ManifestError(f"{where}.nbytes: {nbytes} != numel x itemsize = {expected}")


# ---- the envelope (Note [the envelope]) ----------------------------------------------------------------


def reply_ok(result: Any) -> dict[str, Any]:
    return {"format": REPLY_FORMAT, "ok": True, "result": result}


def reply_error(exc: BaseException) -> dict[str, Any]:
    return {"format": REPLY_FORMAT, "ok": False, "error": str(exc) or type(exc).__name__,
            "error_type": type(exc).__name__}


def unwrap(reply: Any, where: str, default: type[IpcBridgeError]) -> Any:
    """The result of ``reply``, or raise its error as the ipcbridge type it names (else ``default``).

    A reply that is not an envelope raises ``default`` naming ``where`` and the likely cause (another
    ipcbridge version on the other side).
    """
    if not isinstance(reply, Mapping) or reply.get("format") != REPLY_FORMAT or not isinstance(reply.get("ok"), bool):
        raise default(
            f"{where} answered {str(reply)[:200]!r}, which is not an ipcbridge reply; use the same ipcbridge "
            "version in the engine and the trainer"
        )
    if reply["ok"]:
        return reply.get("result")
    message, name = reply.get("error"), reply.get("error_type")
    if not isinstance(message, str):
        raise default(f"{where} reported a failure without a message")
    cls = error_type(name, default)
    if cls is default and name != default.__name__:
        # Not one of ours: say what it was and where, since the type itself cannot cross.
        message = f"{where} refused: {name}: {message}"
    raise cls(message)
