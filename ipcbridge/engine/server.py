"""The embedded engine process: ``python -m ipcbridge.engine.server`` (started by ``LocalEngine``).

It keeps an HF model's weights the way vLLM does (fused ``qkv_proj``/``gate_up_proj``, padded vocab, built
by ``mapping.to_vllm``), runs its own HF model as zero-copy views over them (``attach`` in-process),
generates with a KV cache and a prefix cache, exports the same manifest a vLLM worker would, and obeys
pause/resume so a trainer can fence its updates.

Note [pause gate]
    The engine's pause is a lease (:class:`ipcbridge.fence.LeaseGate`; Note [owned, leased pauses]):
    ``pause`` grants it to one trainer at a time, closes the gate and waits until no generation is in
    flight; requests that arrive meanwhile wait at the gate, or fail with the holder's name. Only the
    lease's id resumes it, and so does the watchdog when the lease runs out. Resuming first drops the prefix
    cache (its KV was computed with the old weights), then moves the version forward (the engine owns
    it) and opens the gate. So every generation runs entirely on one weight version, the one it reports.

Where the trainer cannot map these weights, it streams its own into them: the engine's side of that is
:class:`ipcbridge.stream.receiver.StreamReceiver` (Note [streamed weights] there).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import shutil
import socketserver
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ipcbridge import wire
from ipcbridge.engine import protocol
from ipcbridge.errors import EngineError, FenceError, IpcBridgeError
from ipcbridge.fence import Lease, LeaseGate
from ipcbridge.hf import load_hf_state_dict
from ipcbridge.logprobs import sequence_logprobs
from ipcbridge.stream.receiver import StreamReceiver

logger = logging.getLogger("ipcbridge.engine.server")

PREFIX_CACHE_SIZE = 64


class Engine:
    """The engine's state. Owns the vLLM-layout tensors; its HF model and every consumer only view them."""

    def __init__(self, source: dict[str, Any], device: str, dtype: torch.dtype) -> None:
        import ipcbridge
        from ipcbridge.mapping import to_vllm

        config, hf_state = load_hf_state_dict(source)
        # Own, contiguous storage per vLLM tensor (to_vllm may alias an HF tensor for unfused ones).
        self.weights = {
            n: t.to(device=device, dtype=dtype, copy=True).contiguous() for n, t in to_vllm(hf_state, config).items()
        }
        del hf_state
        self.config = config
        # Export first: on CPU this moves the storages into shared memory in place (see transports.shm),
        # and the views below must be taken of the final memory.
        self.export_manifest = ipcbridge.export(self.weights, config, layout="vllm")
        self.model = ipcbridge.attach(self.weights, config)
        self.model.requires_grad_(False)
        self.device = torch.device(device)
        self.version = 0
        self.gate = LeaseGate(self._publish, name=f"the embedded engine (pid {os.getpid()})")
        self.lock = threading.Lock()  # one forward pass at a time
        self.prefix_cache: OrderedDict[tuple[int, ...], tuple[Any, torch.Tensor]] = OrderedDict()
        self.stats = {"requests": 0, "prefix_hits": 0, "prefix_drops": 0, "pauses": 0, "stream_receives": 0,
                      "stream_bytes": 0}
        self.receiver = StreamReceiver(self.weights, self.device, self.stats)

    # -- generation ----------------------------------------------------------------------------------

    def _prefill(self, prompt: list[int]) -> tuple[Any, torch.Tensor]:
        key = tuple(prompt)
        hit = self.prefix_cache.get(key)
        if hit is not None:
            self.prefix_cache.move_to_end(key)
            self.stats["prefix_hits"] += 1
            return copy.deepcopy(hit[0]), hit[1]
        out = self.model(torch.tensor([prompt], device=self.device), use_cache=True)
        logits = out.logits[0, -1]
        self.prefix_cache[key] = (copy.deepcopy(out.past_key_values), logits)
        if len(self.prefix_cache) > PREFIX_CACHE_SIZE:
            self.prefix_cache.popitem(last=False)
        return out.past_key_values, logits

    @torch.inference_mode()
    def generate_one(self, prompt: list[int], max_tokens: int, temperature: float,
                     generator: torch.Generator | None) -> dict[str, Any]:
        cache, logits = self._prefill(prompt)
        tokens: list[int] = []
        logprobs: list[float] = []
        for i in range(max_tokens):
            lp = torch.log_softmax(logits.float(), dim=-1)
            if temperature <= 0:
                tok = int(torch.argmax(lp))
            else:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                tok = int(torch.multinomial(probs.cpu(), 1, generator=generator))
            tokens.append(tok)
            logprobs.append(float(lp[tok]))
            if i + 1 < max_tokens:
                out = self.model(torch.tensor([[tok]], device=self.device), past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits[0, -1]
        return {"token_ids": tokens, "logprobs": logprobs, "weight_version": self.version}

    def generate(self, prompts: list[list[int]], max_tokens: int, temperature: float, seed: int | None,
                 wait: float, caller: str = "") -> list[dict[str, Any]]:
        vocab = self.model.config.vocab_size
        for p in prompts:
            if not p or any(not isinstance(t, int) or not 0 <= t < vocab for t in p):
                raise ValueError(f"prompts must be non-empty lists of token ids in [0, {vocab})")
        generator = None
        if temperature > 0:
            generator = torch.Generator().manual_seed(seed if seed is not None else self.stats["requests"])
        with self.gate.enter(caller, wait), self.lock:
            self.stats["requests"] += 1
            return [self.generate_one(p, max_tokens, temperature, generator) for p in prompts]

    def score(self, prompt: list[int], completion: list[int], wait: float, caller: str = "") -> list[float]:
        """Logprobs of ``completion`` after ``prompt`` from one full forward pass (no caches)."""
        with self.gate.enter(caller, wait), self.lock:
            return sequence_logprobs(self.model, prompt, completion)

    # -- weight updates ------------------------------------------------------------------------------

    def pause(self, lease: Lease, wait: float, drain: float) -> None:
        self.gate.acquire(lease, wait, drain)
        self.stats["pauses"] += 1

    def _publish(self, reason: str) -> int:
        """Step 4 of Note [the fence], called by the gate with its lock held: no generation runs."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats["prefix_drops"] += len(self.prefix_cache)
        self.prefix_cache.clear()
        self.version += 1
        logger.info("weight version %d (%s)", self.version, reason)
        return self.version

    def manifest(self) -> dict[str, Any]:
        return self.export_manifest.replace(weight_version=self.version).to_dict()

    # -- streamed weights (Note [streamed weights] in ipcbridge.stream.receiver) -----------------------

    def stream_init(self, stream_id: str, host: str, port: int, backend: str, timeout: float,
                    plan: dict[str, Any]) -> None:
        self.receiver.init(stream_id, host, port, backend, timeout, plan)

    def stream_receive(self, stream_id: str) -> dict[str, Any]:
        return self.receiver.receive(stream_id, paused=self.gate.paused, lock=self.lock)

    def stream_close(self, stream_id: str | None = None, wait: float = -1) -> None:
        self.receiver.close(stream_id, wait)


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    engine: Engine
    token: str


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        try:
            msg = protocol.read_message(self.request)
        except (ConnectionError, ValueError) as e:
            self._reply(wire.reply_error(ValueError(f"bad request: {e}")))
            return
        if not protocol.token_ok(msg.get("token"), server.token):
            logger.warning("refused a request with a wrong token")
            self._reply(wire.reply_error(EngineError("wrong token: use the token of the engine you started")))
            return
        op, args = msg.get("op"), msg.get("args") or {}
        try:
            result = _dispatch(server, op, args)
        except IpcBridgeError as e:  # the library's own refusals: the message says it all
            logger.info("request %r refused: %s", op, e)
            self._reply(wire.reply_error(e))
            return
        except Exception as e:  # the envelope carries it to the client (Note [the envelope])
            logger.exception("request %r failed", op)
            self._reply(wire.reply_error(e))
            return
        self._reply(wire.reply_ok(result))

    def _reply(self, msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the client went away; nothing to tell
            self.request.sendall(protocol.encode(msg))


def _lease(args: dict[str, Any]) -> Lease:
    d = args.get("lease")
    if not isinstance(d, dict):
        raise FenceError("the request carries no lease; use the same ipcbridge version in the engine and the trainer")
    return Lease(id=d.get("id"), holder=d.get("holder"), seconds=d.get("seconds"), caller=d.get("caller"))


def _generation_ops(engine: Engine, op: str, args: dict[str, Any]) -> Any:
    wait, caller = float(args.get("wait", 60.0)), str(args.get("caller", ""))
    if op == "generate":
        return engine.generate([list(p) for p in args["prompts"]], int(args.get("max_tokens", 16)),
                               float(args.get("temperature", 0.0)), args.get("seed"), wait, caller)
    return engine.score(list(args["prompt"]), list(args["completion"]), wait, caller)


def _fence_ops(engine: Engine, op: str, args: dict[str, Any]) -> Any:
    lease = _lease(args)
    if op == "pause":
        return engine.pause(lease, float(args.get("wait", 60.0)), float(args.get("drain", 60.0)))
    if op == "renew":
        return engine.gate.renew(lease.id)
    if op == "resume":
        return engine.gate.release(lease.id)
    return engine.gate.cancel(lease.id)


def _dispatch(server: _Server, op: Any, args: dict[str, Any]) -> Any:
    engine = server.engine
    if op == "ping":
        return {"pid": os.getpid(), "version": engine.version, "paused": engine.gate.paused,
                "holder": engine.gate.holder}
    if op == "manifest":
        return engine.manifest()
    if op in ("generate", "score"):
        return _generation_ops(engine, op, args)
    if op in ("pause", "renew", "resume", "cancel"):
        return _fence_ops(engine, op, args)
    if op == "stream_init":
        return engine.stream_init(str(args["stream_id"]), str(args["host"]), int(args["port"]),
                                  str(args["backend"]), float(args["timeout"]), args["plan"])
    if op == "stream_receive":
        return engine.stream_receive(str(args["stream_id"]))
    if op == "stream_close":
        return engine.stream_close(str(args["stream_id"]))
    if op == "stats":
        return {**engine.stats, "version": engine.version, "prefix_cache": len(engine.prefix_cache)}
    if op == "shutdown":
        threading.Thread(target=server.shutdown, daemon=True).start()
        return None
    raise ValueError(f"unknown op {op!r}")


def _exit_with_parent(server: _Server, parent: int, workdir: str) -> None:
    # An engine must not outlive the script that started it: poll, since PR_SET_PDEATHSIG is Linux-only.
    while os.getppid() == parent:
        time.sleep(0.5)
    logger.warning("parent %d exited; shutting down", parent)
    # Nobody is left to clean up the private directory (socket, log): do it here.
    shutil.rmtree(workdir, ignore_errors=True)
    server.shutdown()


def main(argv: list[str] | None = None) -> None:
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
    server = _Server(args.socket, _Handler)
    os.chmod(args.socket, 0o600)
    server.engine, server.token = engine, token
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
