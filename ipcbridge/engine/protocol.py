"""The embedded engine's control channel: one JSON request and one JSON reply per unix-socket connection.

Note [control channel security]
    The socket lives in a fresh 0700 directory (``tempfile.mkdtemp``), so only its user can reach it, and
    every request carries a random token compared in constant time. Messages are JSON only: nothing that
    arrives on the socket is ever unpickled or evaluated.

Note [no hangs]
    Every client call has a deadline (socket timeout). A dead engine shows up as a refused connection or a
    closed socket, a hung one as a timeout; both become ``EngineError`` with the engine's last log lines.
    A request that may wait inside the engine (at the pause gate, for a lease) tells the engine how long
    it may wait, and the client's deadline is that plus :data:`REPLY_GRACE`: the engine's own explanation
    ("paused by ...") always arrives before the client gives up.

Replies are :mod:`ipcbridge.wire` envelopes (Note [the envelope]): an ipcbridge error raised in the
engine (``MappingError``, ``FenceError``) arrives as that type; anything else as ``EngineError``.
"""

from __future__ import annotations

import hmac
import json
import socket
from typing import Any

from ipcbridge import wire
from ipcbridge.errors import EngineError

#: A reply larger than this is refused: manifests of large models are a few MB.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
#: Seconds a client waits beyond the wait it gave the engine. See Note [no hangs].
REPLY_GRACE = 2.0


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


def read_message(sock: socket.socket) -> dict[str, Any]:
    """Read one newline-terminated JSON object. Raises ``ConnectionError`` if the peer closes first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("connection closed before a complete message arrived")
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
        if size > MAX_MESSAGE_BYTES:
            raise ConnectionError(f"message larger than {MAX_MESSAGE_BYTES} bytes")
    msg = json.loads(b"".join(chunks))
    if not isinstance(msg, dict):
        raise ValueError("a message must be a JSON object")
    return msg


def token_ok(given: Any, expected: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


def call(path: str, token: str, op: str, args: dict[str, Any] | None = None, *, timeout: float) -> Any:
    """Send one request to the engine at ``path``; return its result or raise ``EngineError``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(encode({"token": token, "op": op, "args": args or {}}))
            reply = read_message(sock)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise EngineError(f"engine is not running (no listener at {path}: {e.strerror})") from None
    except TimeoutError:
        raise EngineError(f"engine did not answer {op!r} within {timeout:.0f}s; it may be hung or overloaded") from None
    except (ConnectionError, OSError, ValueError) as e:
        raise EngineError(f"engine connection failed during {op!r}: {e}") from None
    return wire.unwrap(reply, f"the engine ({op!r})", EngineError)
