"""The ``ipcbridge_*`` RPC envelope (``ipcbridge.vllm.rpc``): one JSON string each way, errors keep their
ipcbridge type, and anything that is not an envelope names the likely cause."""

from __future__ import annotations

import json
import math

import pytest

from ipcbridge import wire
from ipcbridge.errors import BridgeError, FenceError, ManifestError, MappingError
from ipcbridge.vllm.rpc import decode_reply, parse_float, parse_int, worker_method

WHERE = "the vLLM worker (ipcbridge_manifest)"


def test_reply_roundtrip_and_errors() -> None:
    assert decode_reply(json.dumps(wire.reply_ok({"a": [1, 2]})), WHERE) == {"a": [1, 2]}
    assert decode_reply(json.dumps(wire.reply_ok({"a": [1, 2]})).encode(), WHERE) == {"a": [1, 2]}
    with pytest.raises(MappingError, match="boom"):
        decode_reply(json.dumps(wire.reply_error(MappingError("boom"))), WHERE)
    with pytest.raises(BridgeError, match="boom") as e:
        decode_reply(json.dumps(wire.reply_error(RuntimeError("boom"))), WHERE)
    assert type(e.value) is BridgeError  # a foreign type never crosses: the caller's default
    with pytest.raises(BridgeError, match="not JSON"):
        decode_reply(b"\x82\xa1a", WHERE)  # msgpack bytes, say
    with pytest.raises(BridgeError, match="not an ipcbridge reply"):
        decode_reply(json.dumps({"results": []}), WHERE)
    with pytest.raises(BridgeError, match="worker_extension_cls"):
        decode_reply(None, WHERE)
    with pytest.raises(BridgeError, match="same ipcbridge version"):
        decode_reply(None, WHERE)
    with pytest.raises(BridgeError, match="without a message"):
        decode_reply(json.dumps({"format": "ipcbridge.reply", "ok": False}), WHERE)
    with pytest.raises(BridgeError, match=r"ipcbridge_manifest"):
        decode_reply("[1]", WHERE)  # the error names who answered


@pytest.mark.parametrize("exc", [MappingError("m"), ManifestError("x"), FenceError("held"), BridgeError("b")])
def test_worker_method_keeps_the_error_type(exc: Exception) -> None:
    class Worker:
        @worker_method
        def ipcbridge_fail(self) -> None:
            raise exc

        @worker_method
        def ipcbridge_value(self, x: str) -> dict:
            return {"x": x}

    w = Worker()
    text = w.ipcbridge_fail()
    assert isinstance(text, str)  # one JSON string: Note [replies cross vLLM's msgpack channel]
    with pytest.raises(type(exc), match=str(exc)) as e:
        decode_reply(text, WHERE)
    assert type(e.value) is type(exc)
    assert decode_reply(w.ipcbridge_value("7"), WHERE) == {"x": "7"}
    assert Worker.ipcbridge_value.__name__ == "ipcbridge_value"


def test_parse_int() -> None:
    assert parse_int("12", "seed") == 12 and parse_int(0, "seed") == 0
    for bad in (-1, "-2", True, 1.5, None, "v1"):
        with pytest.raises(BridgeError, match="seed"):
            parse_int(bad, "seed")  # type: ignore[arg-type]
    assert parse_int("-3", "x", minimum=-5) == -3


def test_parse_float() -> None:
    assert parse_float("0.5", "std") == 0.5 and parse_float(2, "std") == 2.0
    for bad in ("x", None, True, "nan", math.inf, [1.0]):
        with pytest.raises(BridgeError, match="std"):
            parse_float(bad, "std")  # type: ignore[arg-type]
