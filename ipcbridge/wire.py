"""What crosses a process boundary: one validation kit, and one RPC envelope.

Everything that arrives from another process (a manifest, a stream plan, a reply from the engine or a vLLM
worker) is checked here, field by field, before it is used; each check names the dotted path of the field
so an error says exactly which one was wrong. Nothing is ever unpickled. JSON text is parsed here too
(:func:`parse_json`), under a size and a depth limit that every caller states, so that no peer can make
a reader buffer without bound or recurse until ``RecursionError``.

Note [the envelope]
    Every RPC answer, on the embedded engine's control socket and from vLLM's ``collective_rpc``, is one
    JSON object: ``{"format": "ipcbridge.reply", "ok": true, "result": ...}`` or ``{"format":
    "ipcbridge.reply", "ok": false, "error": "...", "error_type": "MappingError"}``. :func:`unwrap` returns
    the result or raises the error as the same ipcbridge type (Note [error types cross processes] in
    :mod:`ipcbridge.errors`), so ``except ipcbridge.MappingError`` works whichever process raised it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from ipcbridge.errors import IpcBridgeError, ManifestError, error_type

REPLY_FORMAT = "ipcbridge.reply"

#: The largest int any field may hold: torch's sizes, strides, offsets and byte counts are int64, and a
#: larger value would pass validation only to make torch raise a C++ ``TypeError`` later.
INT64_MAX = 2**63 - 1
#: How deeply JSON that crosses a process may nest. Manifests, stream plans, HF configs and requests nest
#: fewer than 10 levels; Python's decoder recurses once per level and raises ``RecursionError`` near 1000.
MAX_JSON_DEPTH = 64

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


def _short(value: Any, n: int = 40) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else f"an int of {value.bit_length()} bits"
    return text if len(text) <= n else text[:n] + "..."


def check_int(value: Any, where: str, minimum: int | None = 0, maximum: int = INT64_MAX) -> int:
    """An int (not a bool, not a float) in ``[minimum, maximum]``; by default a non-negative int64."""
    check_type(value, int, where)
    if minimum is not None and value < minimum:
        raise ManifestError(f"{where}: must be >= {minimum}, got {_short(value)}")
    if value > maximum:
        limit = "an int64" if maximum == INT64_MAX else f"<= {maximum}"
        raise ManifestError(f"{where}: must be {limit}, got {_short(value)}")
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
    # ``True == 1`` and ``1.0 == 1`` in Python: the type is checked first, so neither passes for version 1.
    check_type(got, int, f"{what}.format_version")
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


def check_strides(shape: tuple[int, ...], stride: tuple[int, ...], where: str) -> None:
    """Every element of the strided view has its own memory location: no zero or overlapping strides.

    The view's elements are parameters a trainer steps in place; two elements sharing one location would
    each receive the other's update (and an optimizer's state would be wrong for both). The test is the
    mixed-radix one: sorted by stride, each dimension's stride exceeds the farthest offset the smaller ones
    reach. It accepts every view torch makes of one tensor without expanding it (row and column slices,
    transposes), and refuses expanded (broadcast) and self-overlapping views.
    """
    if 0 in shape:
        return  # no elements, nothing can overlap
    reach = 0  # the largest offset, in elements, the dimensions seen so far reach
    for s, n, i in sorted((s, n, i) for i, (n, s) in enumerate(zip(shape, stride, strict=True)) if n > 1):
        if s == 0:
            raise ManifestError(
                f"{where}.stride[{i}]: 0 on a dimension of size {n}, so its {n} elements share one memory location "
                "(an expanded tensor), which cannot be trained in place; export a tensor that owns its elements"
            )
        if s <= reach:
            raise ManifestError(
                f"{where}.stride[{i}]: {s} overlaps the dimensions with smaller strides (they reach offset {reach}): "
                "elements of this view would share memory, which cannot be trained in place; export a tensor "
                "whose elements do not alias each other"
            )
        reach += (n - 1) * s


def check_tensor(name: Any, dtype: Any, shape: Any, nbytes: Any, where: str) -> None:
    """The fields every tensor description shares: a name, a known dtype, a shape, and its byte count."""
    check_name(name, where)
    torch_dtype = check_dtype(dtype, f"{where}.dtype")
    check_dims(shape, f"{where}.shape")
    check_int(nbytes, f"{where}.nbytes")
    expected = math.prod(shape) * torch_dtype.itemsize
    if nbytes != expected:
        raise ManifestError(f"{where}.nbytes: {nbytes} != numel x itemsize = {expected}")


# ---- JSON text -----------------------------------------------------------------------------------------

# A string (skipped whole, escapes included) or one bracket: enough to count nesting without a parser.
_JSON_NESTING = {
    bytes: re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|(?P<open>[\[{])|(?P<close>[\]}])', re.DOTALL),
    str: re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|(?P<open>[\[{])|(?P<close>[\]}])', re.DOTALL),
}


def check_json_depth(text: str | bytes, what: str, max_depth: int = MAX_JSON_DEPTH,
                     error: type[IpcBridgeError] = ManifestError, hint: str = "") -> None:
    """Refuse JSON ``text`` nested deeper than ``max_depth``, before a recursive decoder sees it.

    A linear scan (strings skipped whole, so brackets inside them do not count). On valid JSON it counts
    exactly; on invalid JSON it can only over-count, and the decoder refuses that text anyway.
    """
    depth = 0
    pattern = _JSON_NESTING[bytes] if isinstance(text, (bytes, bytearray)) else _JSON_NESTING[str]
    for m in pattern.finditer(text):  # type: ignore[arg-type]
        if m.lastgroup == "open":
            depth += 1
            if depth > max_depth:
                raise error(f"{what}: JSON nested deeper than {max_depth} levels (the limit){hint}")
        elif m.lastgroup == "close":
            depth -= 1


def parse_json(text: Any, what: str, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH,
               error: type[IpcBridgeError] = ManifestError, hint: str = "") -> Any:
    """Decode JSON that came from another process: at most ``max_bytes`` long (characters for a ``str``),
    nested at most ``max_depth`` deep. Every refusal is ``error`` naming ``what`` and the limit; ``hint``
    (``"; do this"``) is appended to each."""
    if not isinstance(text, (str, bytes, bytearray)):
        raise error(f"{what}: expected JSON text, got {type(text).__name__}{hint}")
    if len(text) > max_bytes:
        raise error(f"{what}: {len(text)} bytes of JSON, more than the limit of {max_bytes}{hint}")
    check_json_depth(text, what, max_depth, error, hint)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{what}: not JSON ({str(e)[:200]}){hint}") from None


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
