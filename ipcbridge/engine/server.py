"""The embedded engine process: ``python -m ipcbridge.engine.server`` (started by ``LocalEngine``).

The engine itself (weights, generation, the pause gate) is :class:`ipcbridge.engine.core.Engine`; this
module is its control socket (Note [request framing] in :mod:`ipcbridge.engine.protocol`) and the process.

Note [serving under load]
    The socket listens with a backlog of :data:`LISTEN_BACKLOG`, so a burst of clients queues rather than
    being refused (and clients retry a full backlog; Note [no hangs]). Each accepted connection gets a
    handler thread, at most :data:`MAX_HANDLERS` at once; beyond that a connection is answered at once
    with a "busy" error that clients retry, so a flood of connections costs threads only up to the bound.
    A peer has :data:`~ipcbridge.engine.protocol.READ_DEADLINE_SECONDS` to send its whole request, so
    stalled peers give their threads back. Every bad request is answered (``ok: false``, naming what was
    wrong) and never stops the engine from serving everyone else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import shutil
import socket
import socketserver
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ipcbridge import wire
from ipcbridge.engine import protocol
from ipcbridge.engine.inputs import DEFAULT_DEADLINE_SECONDS, Budget, Sampling, check_int, check_number
from ipcbridge.errors import EngineError, FenceError, IpcBridgeError
from ipcbridge.fence import Lease

logger = logging.getLogger("ipcbridge.engine.server")

#: Connections the kernel queues before the engine accepts them: bursts from a trainer's worker pool
#: (socketserver's default of 5 lost requests to 8 threads pinging at once).
LISTEN_BACKLOG = 128
#: Handler threads at once. Each is one request: waiting at the gate or for the forward lock, or reading
#: from a slow peer (for at most the read deadline). 64 is many times a trainer's concurrency and bounds
#: what a flood of connections costs.
MAX_HANDLERS = 64
#: Seconds to wait for a "busy" reply to be taken by a peer that does not read it.
_BUSY_SEND_SECONDS = 1.0


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A threaded unix-socket server with a bounded number of handler threads (Note [serving under load])."""

    daemon_threads = True
    block_on_close = False  # closing must not wait for a stalled peer or a long request (both are bounded)
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, path: str, engine: Any, token: str, *, read_seconds: float = protocol.READ_DEADLINE_SECONDS,
                 max_handlers: int = MAX_HANDLERS) -> None:
        super().__init__(path, _Handler)
        self.engine = engine
        self.token = token
        self.read_seconds = read_seconds
        self._slots = threading.BoundedSemaphore(max_handlers)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            busy = EngineError("engine busy: every request handler is taken, and stayed taken until this client's "
                               "deadline; retry later, or raise the request timeout")
            _reply(request, {**wire.reply_error(busy), "retry": True}, _BUSY_SEND_SECONDS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("control socket: a request failed outside its handler")


def _reply(sock: socket.socket, msg: dict[str, Any], timeout: float) -> None:
    with contextlib.suppress(OSError):  # the client went away; nothing to tell
        sock.settimeout(timeout)
        sock.sendall(protocol.encode(msg))


def _peer_gone(sock: socket.socket) -> bool:
    """The client closed its end (it gave up, or was cancelled): Note [bounded requests]."""
    try:
        if not select.select([sock], [], [], 0)[0]:
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        sock: socket.socket = self.request
        try:
            op, args = protocol.read_request(sock, server.token, server.read_seconds)
        except EngineError as e:
            logger.warning("refused a request: %s", e)
            self._answer(wire.reply_error(e))
            return
        except TimeoutError:
            self._answer(wire.reply_error(EngineError(
                f"bad request: no complete request within {server.read_seconds:.0f}s of connecting")))
            return
        except (ConnectionError, OSError) as e:
            logger.info("a client left before sending a whole request: %s", e)
            return
        try:
            result = _dispatch(server, op, args, lambda: _peer_gone(sock))
        except IpcBridgeError as e:  # the library's own refusals: the message says it all
            logger.info("request %r refused: %s", op, e)
            self._answer(wire.reply_error(e))
            return
        except Exception as e:  # the envelope carries it to the client (Note [the envelope])
            logger.exception("request %r failed", op)
            self._answer(wire.reply_error(e))
            return
        self._answer(wire.reply_ok(result))

    def _answer(self, msg: dict[str, Any]) -> None:
        _reply(self.request, msg, self.server.read_seconds)  # type: ignore[attr-defined]


# ---- requests -----------------------------------------------------------------------------------------


def _arg(args: dict[str, Any], op: str, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """``args[name]``, of type ``kind``; ``EngineError`` ("bad request") naming it if missing or mistyped."""
    if name not in args:
        if default is ...:
            raise EngineError(f"bad request: {op!r} needs args.{name}")
        return default
    value = args[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise EngineError(f"bad request: {op}: args.{name} must not be a bool")
    if not isinstance(value, kind):
        raise EngineError(f"bad request: {op}: args.{name} has the wrong type ({type(value).__name__})")
    return value


def _budget(args: dict[str, Any], op: str, gone: Any) -> tuple[float, str, Budget]:
    """The wait at the gate, the caller, and the request's budget (Note [bounded requests])."""
    wait = check_number(_arg(args, op, "wait", (int, float), 60.0), f"{op}: args.wait")
    caller = _arg(args, op, "caller", str, "")
    seconds = check_number(_arg(args, op, "deadline", (int, float), DEFAULT_DEADLINE_SECONDS), f"{op}: args.deadline")
    return wait, caller, Budget.start(seconds, gone)


def _generation_ops(engine: Any, op: str, args: dict[str, Any], gone: Any) -> Any:
    wait, caller, budget = _budget(args, op, gone)
    if op == "generate":
        sampling = Sampling.from_dict(_arg(args, op, "sampling", (dict, type(None)), None))
        return engine.generate(_arg(args, op, "prompts", list), _arg(args, op, "max_tokens", int, 16),
                               _arg(args, op, "temperature", (int, float), 0.0), _arg(args, op, "seed", (int, type(None)), None),
                               wait, caller, budget, sampling)
    return engine.score(_arg(args, op, "prompt", list), _arg(args, op, "completion", list), wait, caller, budget)


def _lease(args: dict[str, Any]) -> Lease:
    d = args.get("lease")
    if not isinstance(d, dict):
        raise FenceError("the request carries no lease; use the same ipcbridge version in the engine and the trainer")
    return Lease(id=d.get("id"), holder=d.get("holder"), seconds=d.get("seconds"), caller=d.get("caller"))


def _fence_ops(engine: Any, op: str, args: dict[str, Any]) -> Any:
    lease = _lease(args)
    if op == "pause":
        return engine.pause(lease, check_number(_arg(args, op, "wait", (int, float), 60.0), "pause: args.wait"),
                            check_number(_arg(args, op, "drain", (int, float), 60.0), "pause: args.drain"))
    if op == "renew":
        return engine.gate.renew(lease.id)
    if op == "resume":
        return engine.gate.release(lease.id)
    return engine.gate.cancel(lease.id)


def _stream_ops(engine: Any, op: str, args: dict[str, Any]) -> Any:
    stream_id = _arg(args, op, "stream_id", str)
    if op == "stream_init":
        return engine.stream_init(stream_id, _arg(args, op, "host", str),
                                  check_int(_arg(args, op, "port", int), "stream_init: args.port", 0, 65535),
                                  _arg(args, op, "backend", str),
                                  check_number(_arg(args, op, "timeout", (int, float)), "stream_init: args.timeout"),
                                  _arg(args, op, "plan", dict))
    if op == "stream_receive":
        return engine.stream_receive(stream_id)
    return engine.stream_close(stream_id)


def _dispatch(server: _Server, op: str, args: dict[str, Any], gone: Any) -> Any:
    engine = server.engine
    if op == "ping":
        return engine.ping()
    if op == "manifest":
        return engine.manifest()
    if op in ("generate", "score"):
        return _generation_ops(engine, op, args, gone)
    if op in ("pause", "renew", "resume", "cancel"):
        return _fence_ops(engine, op, args)
    if op in ("stream_init", "stream_receive", "stream_close"):
        return _stream_ops(engine, op, args)
    if op == "stats":
        return {**engine.stats, "version": engine.version, "prefix_cache": len(engine.prefix_cache)}
    if op == "shutdown":
        threading.Thread(target=server.shutdown, daemon=True).start()
        return None
    raise EngineError(f"bad request: unknown op {op!r:.60}; use the same ipcbridge version in the engine and the trainer")


# ---- the process ----------------------------------------------------------------------------------------


def _exit_with_parent(server: _Server, parent: int, workdir: str) -> None:
    # An engine must not outlive the script that started it: poll, since PR_SET_PDEATHSIG is Linux-only.
    while os.getppid() == parent:
        time.sleep(0.5)
    logger.warning("parent %d exited; shutting down", parent)
    # Nobody is left to clean up the private directory (socket, log): do it here.
    shutil.rmtree(workdir, ignore_errors=True)
    server.shutdown()


def main(argv: list[str] | None = None) -> None:
    from ipcbridge.engine.core import Engine

    ap = argparse.ArgumentParser(prog="python -m ipcbridge.engine.server")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--source", required=True, help="JSON file: {'config': {...}, 'seed': n} or {'path': dir}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--parent", type=int, default=0, help="exit when this process is no longer our parent")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    token = sys.stdin.readline().strip()
    if not token:
        raise SystemExit("no token on stdin")
    torch.set_num_threads(max(1, min(4, (os.cpu_count() or 2) // 2)))
    source = json.loads(Path(args.source).read_text())
    engine = Engine(source, args.device, getattr(torch, args.dtype))
    server = _Server(args.socket, engine, token)
    os.chmod(args.socket, 0o600)
    if args.parent:
        workdir = os.path.dirname(os.path.abspath(args.socket))
        threading.Thread(target=_exit_with_parent, args=(server, args.parent, workdir), daemon=True).start()
    logger.info("serving %s on %s (%s, %s)", engine.config.model_type, args.socket, args.device, args.dtype)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        engine.stream_close(wait=5.0)
        server.server_close()
        logger.info("stopped")


if __name__ == "__main__":
    main()
