"""The embedded engine's control socket against hostile and merely busy peers: real sockets, forged bytes.

Most cases talk to a real engine process; the timing cases (stalled peers, the handler bound) run the same
server class in-process with short limits, so they take a fraction of a second instead of the default 10 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import ipcbridge
from ipcbridge import EngineError, wire
from ipcbridge.engine import protocol, server
from tests.helpers import tiny_config

PROMPT = [3, 14, 15, 92]


@pytest.fixture(scope="module")
def engine():
    with ipcbridge.LocalEngine(tiny_config("llama"), device="cpu", request_timeout=10.0) as eng:
        yield eng


def raw(path: str, data: bytes, timeout: float = 10.0) -> dict[str, Any]:
    """Send ``data`` as it is and return the engine's one-line reply, parsed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        reply = protocol.LineReader(s, time.monotonic() + timeout).line(protocol.MAX_REPLY_BYTES, "reply")
    return json.loads(reply)


def header(token: str, op: str = "ping", **extra: Any) -> bytes:
    return protocol.encode({"token": token, "op": op, **extra})


def refused(reply: dict[str, Any], *words: str) -> str:
    assert reply["format"] == wire.REPLY_FORMAT and reply["ok"] is False, reply
    for w in words:
        assert w in reply["error"], reply["error"]
    return reply["error"]


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


# ---- concurrency -----------------------------------------------------------------------------------------


def test_32_threads_of_requests_are_all_answered(engine) -> None:
    errors: list[BaseException] = []

    def client() -> None:
        for _ in range(5):
            try:
                protocol.call(engine.socket_path, engine._token, "ping", timeout=30)
            except BaseException as e:
                errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_a_full_backlog_is_retried_not_fatal() -> None:
    """A listener whose backlog is full (connect says EAGAIN) and that starts accepting 0.5 s later."""
    path = os.path.join(tempfile.mkdtemp(), "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler.connect(path)  # takes the one backlog slot
    filler.sendall(header("t") + b"{}\n")

    def serve() -> None:
        time.sleep(0.5)
        listener.settimeout(5)
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                protocol.LineReader(conn, time.monotonic() + 5).line(100, "header")
                conn.sendall(protocol.encode(wire.reply_ok("pong")))

    t = threading.Thread(target=serve)
    t.start()
    try:
        assert protocol.call(path, "t", "ping", timeout=5) == "pong"
    finally:
        t.join(10)
        filler.close()
        listener.close()


# ---- forged requests to the real engine ---------------------------------------------------------------------


def test_a_wrong_or_missing_token_is_answered_with_token(engine) -> None:
    refused(raw(engine.socket_path, header("not-the-token") + b"{}\n"), "token")
    refused(raw(engine.socket_path, protocol.encode({"op": "ping"}) + b"{}\n"), "token")
    refused(raw(engine.socket_path, protocol.encode({"token": 42, "op": "ping"}) + b"{}\n"), "token")


@pytest.mark.parametrize("data", [b"hello\n", b"[1, 2]\n", b"\xff\xfe\n", b'{"token": \n', b"null\n"])
def test_unparseable_input_is_a_bad_request(engine, data: bytes) -> None:
    refused(raw(engine.socket_path, data), "bad request")


def test_deep_nesting_is_answered_not_a_recursion_error(engine) -> None:
    refused(raw(engine.socket_path, b"[" * 100_000 + b"\n"), "bad request")
    nested = b"[" * 100_000 + b"]" * 100_000
    error = refused(raw(engine.socket_path, header(engine._token, "generate") + b'{"prompts":' + nested + b"}\n"),
                    "bad request")
    assert "nested deeper than" in error


def test_a_100_mib_request_without_the_token_is_refused_after_a_few_kib(engine) -> None:
    """The old engine read and parsed all of it before looking at the token (+300 MiB peak)."""
    before = peak_rss_kib(engine.pid)
    chunk = b"x" * (1 << 20)
    sent = 0
    reply: dict[str, Any] = {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(engine.socket_path)
        try:
            s.sendall(b'{"token":"wrong","op":"ping","padding":"')
            for _ in range(100):
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = json.loads(protocol.LineReader(s, time.monotonic() + 10).line(1 << 20, "reply"))
    refused(reply, "bad request", "header is larger than")
    assert sent < 8 << 20
    assert peak_rss_kib(engine.pid) - before < 32 * 1024


def test_oversized_arguments_are_refused_while_reading(engine) -> None:
    big = b'{"prompts":[[' + b"1," * (protocol.MAX_REQUEST_BYTES // 2) + b"1]]}\n"
    refused(raw(engine.socket_path, header(engine._token, "generate") + big),
            "bad request", f"larger than the limit of {protocol.MAX_REQUEST_BYTES} bytes")
    with pytest.raises(EngineError, match="split it into several calls"):  # ...and refused before sending
        protocol.call(engine.socket_path, engine._token, "generate", {"prompts": [[1] * 600_000]}, timeout=5)


@pytest.mark.parametrize(
    ("op", "args", "words"),
    [
        ("nope", {}, ("bad request", "unknown op 'nope'")),
        ("generate", {}, ("bad request", "needs args.prompts")),
        ("generate", {"prompts": "abc"}, ("bad request", "args.prompts")),
        ("generate", {"prompts": [[1]], "max_tokens": True}, ("max_tokens",)),
        ("generate", {"prompts": [[1]], "wait": "forever"}, ("args.wait",)),
        ("score", {"prompt": [1], "completion": [[2]]}, ("completion",)),
        ("pause", {"lease": {"id": 1}}, ("lease",)),
        ("stream_init", {"stream_id": "s", "host": "h", "port": 10**6, "backend": "gloo", "timeout": 1,
                         "plan": {}}, ("port",)),
    ],
)
def test_bad_arguments_are_named(engine, op: str, args: dict[str, Any], words: tuple[str, ...]) -> None:
    refused(raw(engine.socket_path, header(engine._token, op) + protocol.encode(args)), *words)


def test_the_engine_keeps_serving_everyone_else(engine) -> None:
    assert engine.alive
    assert engine.generate([PROMPT], max_tokens=2)[0].token_ids
    assert "Traceback" not in Path(engine.log_path).read_text()


# ---- the same server in-process, with short limits ---------------------------------------------------------


class _Pinged:
    def ping(self) -> dict[str, Any]:
        return {"pong": True}


@pytest.fixture
def small_server():
    """``(path, token, server)`` of the engine's server class serving a stub, 2 s read deadline, 2 handlers."""
    path = os.path.join(tempfile.mkdtemp(), "s")
    srv = server._Server(path, _Pinged(), "tok", read_seconds=2.0, max_handlers=2)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield path, "tok", srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


def stalled(path: str, data: bytes = b"") -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    if data:  # a busy server may already have answered and closed: sending nothing must not fail on that
        s.sendall(data)
    return s


def test_a_stalled_peer_is_cut_at_the_read_deadline(small_server) -> None:
    path, _, _ = small_server
    t0 = time.monotonic()
    with stalled(path, b'{"token": "tok", "op"') as s:
        s.settimeout(5)
        reply = json.loads(protocol.LineReader(s, time.monotonic() + 5).line(4096, "reply"))
    refused(reply, "bad request", "no complete request within")
    assert 1.9 < time.monotonic() - t0 < 4.0


def test_handler_threads_are_bounded_and_busy_clients_retry(small_server) -> None:
    path, token, _ = small_server
    threads_before = threading.active_count()
    peers = [stalled(path) for _ in range(30)]  # a flood of connections that never send a byte
    try:
        time.sleep(0.2)
        assert threading.active_count() - threads_before <= 2
        busy = raw(path, header(token) + b"{}\n", timeout=5)
        assert busy.get("retry") is True and "busy" in refused(busy)
        t0 = time.monotonic()
        assert protocol.call(path, token, "ping", timeout=10) == {"pong": True}  # retried until a handler freed
        assert time.monotonic() - t0 < 5
    finally:
        for p in peers:
            p.close()
