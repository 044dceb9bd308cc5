"""The embedded engine's control channel: one request and one JSON reply per unix-socket connection.

Note [control channel security]
    The socket lives in a fresh 0700 directory (``tempfile.mkdtemp``), so only its user can reach it, and
    every request carries a random token compared in constant time. Messages are JSON only: nothing that
    arrives on the socket is ever unpickled or evaluated.

Note [request framing]
    A request is two newline-terminated JSON objects: a header ``{"token": ..., "op": ...}`` of at most
    :data:`MAX_HEADER_BYTES`, then the arguments, at most :data:`MAX_REQUEST_BYTES`. The engine reads the
    header and checks the token before it reads a byte of the arguments, so a peer without the token can
    make it buffer a few KiB at most. Each line's cap is enforced while reading (never more than the cap is
    buffered), JSON depth is limited (:func:`ipcbridge.wire.parse_json`), and the whole request must arrive
    within :data:`READ_DEADLINE_SECONDS` of the connection. A bad request is answered with ``ok: false``
    naming what was wrong ("token", "bad request: ..."), then the connection is closed.

Note [no hangs]
    Every client call has a deadline. A dead engine shows up as a refused connection or a closed socket, a
    hung one as a timeout; both become ``EngineError`` with the engine's last log lines. A full listen
    backlog (``EAGAIN`` on connect) and an engine answering "busy" (every handler thread taken) are
    retried with backoff until the deadline: neither means the request was seen. A request that may wait
    inside the engine (at the pause gate, for a lease) tells the engine how long it may take, and the
    client's deadline is that plus :data:`REPLY_GRACE`: the engine's own explanation ("paused by ...",
    "ran past its deadline") always arrives before the client gives up.

Replies are :mod:`ipcbridge.wire` envelopes (Note [the envelope]): an ipcbridge error raised in the
engine (``MappingError``, ``FenceError``) arrives as that type; anything else as ``EngineError``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import random
import socket
import time
from typing import Any

from ipcbridge import wire
from ipcbridge.errors import EngineError

#: A request header holds a 43-character token and an op name: ~100 bytes; 4 KiB is ample.
MAX_HEADER_BYTES = 4 * 1024
#: A request's arguments. Legitimate ones are kilobytes (a stream plan, a batch of prompts: 1 MiB holds
#: 150,000 token ids, more than the reference engine serves at once); the cap bounds what a peer with the
#: token can make the engine buffer. Larger batches are split into several calls.
MAX_REQUEST_BYTES = 1024 * 1024
#: A reply larger than this is refused: the largest, a manifest of a 400B model, is about 1 MB.
MAX_REPLY_BYTES = 64 * 1024 * 1024
#: Seconds a peer has, from connecting, to send its whole request. A client sends it at once, so 10 s is
#: generous on a loaded machine; the limit bounds how long a stalled peer holds a handler thread.
READ_DEADLINE_SECONDS = 10.0
#: Seconds a client waits beyond the wait it gave the engine. See Note [no hangs].
REPLY_GRACE = 2.0
#: Longest a blocked read waits before it wakes. A ``recv`` blocked in C does not return for a signal that
#: ``_thread.interrupt_main`` simulates (or one another thread received), so Ctrl-C while a trainer waits
#: for the engine's pause would wait for the reply; waking lets the handler raise ``KeyboardInterrupt``.
_WAKE_SECONDS = 0.1

#: Bytes read per ``recv``.
_CHUNK = 64 * 1024
#: Backoff between connection attempts to a full backlog or a busy engine: from 1 ms, doubling, to 100 ms.
_BACKOFF_FIRST, _BACKOFF_MAX = 0.001, 0.1
#: How long a refused connection (no listener) is retried: an engine closing its socket to restart is
#: not something a client waits for, and a dead engine refuses forever.
_REFUSED_RETRY_SECONDS = 1.0


def encode(msg: dict[str, Any]) -> bytes:
    """One message as a newline-terminated JSON line."""
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def encode_request(token: str, op: str, args: dict[str, Any] | None) -> bytes:
    """Note [request framing]: the header line, then the arguments line. Refuses oversized arguments here,
    before anything is sent."""
    body = encode(args or {})
    if len(body) > MAX_REQUEST_BYTES:
        raise EngineError(
            f"the {op!r} request is {len(body)} bytes, more than the engine accepts ({MAX_REQUEST_BYTES}); split it "
            "into several calls (e.g. fewer prompts per generate)"
        )
    return encode({"token": token, "op": op}) + body


class LineReader:
    """Newline-terminated lines from a socket, each under its own size cap, all before one deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self._buf = bytearray()

    def line(self, limit: int, what: str) -> bytes:
        """The next line (without its newline). ``EngineError`` if it is longer than ``limit`` or not complete
        by the deadline (the cap holds while reading: at most ``limit + 1`` bytes are ever buffered);
        ``ConnectionError`` if the peer closes first."""
        while True:
            end = self._buf.find(b"\n")
            if end > limit or (end < 0 and len(self._buf) > limit):
                raise EngineError(f"bad request: the {what} is larger than the limit of {limit} bytes")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[:end + 1]
                return line
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete {what} before the deadline")
            self.sock.settimeout(min(remaining, _WAKE_SECONDS))
            try:
                chunk = self.sock.recv(min(_CHUNK, limit + 1 - len(self._buf)))
            except TimeoutError:
                continue  # the deadline is checked above; meanwhile the main thread ran its signal handlers
            if not chunk:
                raise ConnectionError(f"connection closed before a complete {what} arrived")
            self._buf += chunk


def _json_object(raw: bytes, what: str, max_bytes: int) -> dict[str, Any]:
    msg = wire.parse_json(raw, f"bad request: the {what}", max_bytes=max_bytes, error=EngineError)
    if not isinstance(msg, dict):
        raise EngineError(f"bad request: the {what} must be a JSON object, got {type(msg).__name__}")
    return msg


def read_request(sock: socket.socket, token: str, read_seconds: float) -> tuple[str, dict[str, Any]]:
    """The engine's side of Note [request framing]: ``(op, args)`` of one request, read within
    ``read_seconds``. ``EngineError`` says what was wrong ("token", "bad request: ..."); ``TimeoutError``
    and ``ConnectionError`` mean the peer did not send a whole request."""
    reader = LineReader(sock, time.monotonic() + read_seconds)
    header = _json_object(reader.line(MAX_HEADER_BYTES, "request header"), "request header", MAX_HEADER_BYTES)
    if not token_ok(header.get("token"), token):
        raise EngineError("wrong token (or none): use the token of the engine you started (LocalEngine sends it)")
    op = header.get("op")
    if not isinstance(op, str) or not op:
        raise EngineError(f"bad request: the header's op must be a non-empty string, got {op!r:.60}")
    args = _json_object(reader.line(MAX_REQUEST_BYTES, f"{op!r} arguments"), f"{op!r} arguments", MAX_REQUEST_BYTES)
    return op, args


def token_ok(given: Any, expected: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


def _connect(path: str, deadline: float) -> socket.socket:
    """A connection to the engine; a full backlog is retried until ``deadline``. See Note [no hangs]."""
    delay = _BACKOFF_FIRST
    refused_until = min(deadline, time.monotonic() + _REFUSED_RETRY_SECONDS)
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            sock.connect(path)
            return sock
        except FileNotFoundError:
            sock.close()
            raise EngineError(f"engine is not running (no socket at {path})") from None
        except (BlockingIOError, InterruptedError, ConnectionRefusedError) as e:
            sock.close()
            refused = isinstance(e, ConnectionRefusedError)
            if time.monotonic() + delay >= (refused_until if refused else deadline):
                if refused:
                    raise EngineError(f"engine is not running (no listener at {path}: {e.strerror})") from None
                raise TimeoutError from None
        except BaseException:
            sock.close()
            raise
        time.sleep(delay * random.uniform(0.5, 1.0))  # jittered, so retrying clients do not stay in step
        delay = min(delay * 2, _BACKOFF_MAX)


def _exchange(path: str, request: bytes, deadline: float, op: str) -> Any:
    """Send one request and read its reply (a parsed JSON value)."""
    with _connect(path, deadline) as sock:
        # An engine that refuses a request before reading all of it (wrong token, too large) closes its end:
        # sending then fails, and the reply it wrote first says why.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        raw = LineReader(sock, deadline).line(MAX_REPLY_BYTES, "reply")
    return wire.parse_json(raw, f"the engine's reply to {op!r}", max_bytes=MAX_REPLY_BYTES, error=EngineError)


def call(path: str, token: str, op: str, args: dict[str, Any] | None = None, *, timeout: float) -> Any:
    """Send one request to the engine at ``path``; return its result or raise ``EngineError``."""
    request = encode_request(token, op, args)
    deadline = time.monotonic() + timeout
    delay = _BACKOFF_FIRST
    while True:
        try:
            reply = _exchange(path, request, deadline, op)
        except TimeoutError:
            raise EngineError(f"engine did not answer {op!r} within {timeout:.0f}s; it may be hung or overloaded") from None
        except EngineError:
            raise
        except (ConnectionError, OSError) as e:
            raise EngineError(f"engine connection failed during {op!r}: {e}") from None
        if not (isinstance(reply, dict) and reply.get("retry") is True) or time.monotonic() + delay >= deadline:
            return wire.unwrap(reply, f"the engine ({op!r})", EngineError)
        time.sleep(delay * random.uniform(0.5, 1.0))  # "busy": the request was not run; Note [no hangs]
        delay = min(delay * 2, _BACKOFF_MAX)
