"""The embedded engine process: ``python -m ipcbridge.engine.server`` (started by ``LocalEngine``).

It keeps an HF model's weights the way vLLM does (fused ``qkv_proj``/``gate_up_proj``, padded vocab, built
by ``mapping.to_vllm``), runs its own HF model as zero-copy views over them (``attach`` in-process),
generates with a KV cache and a prefix cache, exports the same manifest a vLLM worker would, and obeys
pause/resume so a trainer can fence its updates.

Note [pause gate]
    ``pause`` closes the gate and waits until no generation is in flight; requests that arrive while paused
    wait at the gate. ``resume(version)`` first drops the prefix cache (its KV was computed with the old
    weights), then records the version and opens the gate. So every generation runs entirely on one weight
    version, the one it reports.

Note [streamed weights]
    Where the trainer cannot map these weights (another GPU or node), ``ipcbridge.stream`` broadcasts its
    own weights into them (``ipcbridge.transports.nccl``). ``stream_init`` joins the trainer's private
    process group as rank 1, checks the trainer's plan against ``weights`` once and keeps it;
    ``stream_receive`` (only while paused) receives every bucket and copies it into ``weights`` in place, so the HF model's views
    and every exported handle see the new values. Any failure closes the group, which makes the trainer's
    pending broadcasts fail at once rather than at the timeout.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ipcbridge.engine import protocol

logger = logging.getLogger("ipcbridge.engine.server")

PREFIX_CACHE_SIZE = 64


class Gate:
    """In-flight counting with a pausable gate. See Note [pause gate]."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._paused = False
        self._inflight = 0

    @contextmanager
    def enter(self, timeout: float) -> Iterator[None]:
        with self._cv:
            if not self._cv.wait_for(lambda: not self._paused, timeout):
                raise TimeoutError(f"engine stayed paused for {timeout:.0f}s (is a trainer stuck in bridge.update()?)")
            self._inflight += 1
        try:
            yield
        finally:
            with self._cv:
                self._inflight -= 1
                self._cv.notify_all()

    def pause(self, timeout: float) -> None:
        with self._cv:
            self._paused = True
            if not self._cv.wait_for(lambda: self._inflight == 0, timeout):
                self._paused = False
                self._cv.notify_all()
                raise TimeoutError(f"in-flight generation did not finish within {timeout:.0f}s")

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused


def load_hf_state_dict(source: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    """(HF config, HF state dict) from ``{"config": {...}, "seed": n}`` or ``{"path": local_dir}``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ipcbridge.attach import to_hf_config

    if "path" in source:
        from safetensors.torch import load_file

        path = Path(source["path"])
        config = AutoConfig.from_pretrained(path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path}")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return config, state
    config = to_hf_config(source["config"])
    torch.manual_seed(int(source.get("seed", 0)))
    model = AutoModelForCausalLM.from_config(config)
    return config, {n: p.detach() for n, p in model.named_parameters()}


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
        self.gate = Gate()
        self.lock = threading.Lock()  # one forward pass at a time
        self.prefix_cache: OrderedDict[tuple[int, ...], tuple[Any, torch.Tensor]] = OrderedDict()
        self.stats = {"requests": 0, "prefix_hits": 0, "prefix_drops": 0, "pauses": 0, "stream_receives": 0,
                      "stream_bytes": 0}
        self.stream_group: Any = None  # a transports.nccl.TorchGroup while a trainer streams weights
        self.stream_backend = ""
        self.stream_id = ""  # chosen by the trainer: requests of a replaced stream must not use the new one
        self.stream_plan: Any = None  # the transports.nccl.StreamPlan checked at stream_init
        self.stream_lock = threading.Lock()  # one stream operation at a time

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
                 wait: float) -> list[dict[str, Any]]:
        vocab = self.model.config.vocab_size
        for p in prompts:
            if not p or any(not isinstance(t, int) or not 0 <= t < vocab for t in p):
                raise ValueError(f"prompts must be non-empty lists of token ids in [0, {vocab})")
        generator = None
        if temperature > 0:
            generator = torch.Generator().manual_seed(seed if seed is not None else self.stats["requests"])
        with self.gate.enter(wait), self.lock:
            self.stats["requests"] += 1
            return [self.generate_one(p, max_tokens, temperature, generator) for p in prompts]

    def score(self, prompt: list[int], completion: list[int], wait: float) -> list[float]:
        """Logprobs of ``completion`` after ``prompt`` from one full forward pass (no caches)."""
        from ipcbridge.bridge import sequence_logprobs

        with self.gate.enter(wait), self.lock:
            return sequence_logprobs(self.model, prompt, completion)

    # -- weight updates ------------------------------------------------------------------------------

    def pause(self, timeout: float) -> None:
        self.gate.pause(timeout)
        self.stats["pauses"] += 1

    def resume(self, version: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats["prefix_drops"] += len(self.prefix_cache)
        self.prefix_cache.clear()
        self.version = version
        self.gate.resume()

    def manifest(self) -> dict[str, Any]:
        return self.export_manifest.replace(weight_version=self.version).to_dict()

    # -- streamed weights (Note [streamed weights]) --------------------------------------------------

    def _check_plan(self, plan: Any) -> None:
        slots = {s.name: s for s in plan.slots}
        missing = sorted(self.weights.keys() - slots.keys())
        extra = sorted(slots.keys() - self.weights.keys())
        if missing or extra:
            raise ValueError(
                f"the stream plan does not cover this engine's weights: missing {missing[:8]}, unknown "
                f"{extra[:8]}; build it from this engine's manifest"
            )
        for name, t in self.weights.items():
            s = slots[name]
            if s.shape != tuple(t.shape) or s.torch_dtype != t.dtype:
                raise ValueError(
                    f"{name}: the stream plan has {s.dtype} {list(s.shape)}, this engine holds {t.dtype} "
                    f"{list(t.shape)}; build the plan from this engine's manifest"
                )

    def stream_init(self, stream_id: str, host: str, port: int, backend: str, timeout: float,
                    plan: dict[str, Any]) -> None:
        from ipcbridge.transports import nccl

        with self.stream_lock:
            checked = nccl.StreamPlan.from_dict(plan)
            self._check_plan(checked)
            nccl.check_backend(backend, self.device if backend == "nccl" else "cpu")
            self._close_stream()  # a new trainer replaces the previous one
            store = nccl.client_store(host, port, timeout)
            # Tells the trainer its request passed the checks, so it may block joining the group.
            store.set(nccl.READY_KEY, "1")
            self.stream_group = nccl.TorchGroup.join(store, 1, 2, backend, timeout, host)
            self.stream_backend, self.stream_id, self.stream_plan = backend, stream_id, checked

    def _load(self, views: dict[str, torch.Tensor]) -> None:
        for name, view in views.items():
            self.weights[name].copy_(view)

    def stream_receive(self, stream_id: str) -> dict[str, Any]:
        from ipcbridge.transports import nccl

        with self.stream_lock:
            group = self.stream_group
            if group is None or stream_id != self.stream_id:
                raise RuntimeError(
                    "this weight stream is not open in the engine (closed after a failure, or replaced by a newer "
                    "ipcbridge.stream()); open a new stream"
                )
            t0 = time.perf_counter()
            error = None
            try:
                if not self.gate.paused:
                    raise RuntimeError("weights can be streamed in only while the engine is paused; pause first")
                device = self.device if self.stream_backend == "nccl" else torch.device("cpu")
                with self.lock:
                    nbytes = nccl.receive(group, self.stream_plan, self._load, device=device)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            del group
            if error is not None:
                # Outside the except block, so no traceback keeps the failed group (and its connections) alive.
                self._close_stream(abort=True)
                raise RuntimeError(f"receiving streamed weights failed, stream closed: {error}")
            self.stats["stream_receives"] += 1
            self.stats["stream_bytes"] += nbytes
            return {"bytes": nbytes, "seconds": time.perf_counter() - t0}

    def _close_stream(self, abort: bool = False) -> None:
        group, self.stream_group = self.stream_group, None
        if group is not None:
            group.close(abort=abort)
            logger.info("weight stream closed")

    def stream_close(self, stream_id: str | None = None, wait: float = -1) -> None:
        """Leave the trainer's group (only if it is ``stream_id``'s; any with ``None``).

        ``wait``: seconds to wait for a running stream operation (-1: no limit).
        """
        if not self.stream_lock.acquire(timeout=wait):
            logger.warning("a stream operation is still running; not closing its group")
            return
        try:
            if stream_id is None or stream_id == self.stream_id:
                self._close_stream()
        finally:
            self.stream_lock.release()


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
            self._reply({"ok": False, "error": f"bad request: {e}"})
            return
        if not protocol.token_ok(msg.get("token"), server.token):
            logger.warning("refused a request with a wrong token")
            self._reply({"ok": False, "error": "wrong token: use the token of the engine you started"})
            return
        op, args = msg.get("op"), msg.get("args") or {}
        try:
            result = self.dispatch(server, op, args)
        except Exception as e:  # the reply carries it to the client, which raises EngineError
            logger.exception("request %r failed", op)
            self._reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
            return
        self._reply({"ok": True, "result": result})

    def dispatch(self, server: _Server, op: Any, args: dict[str, Any]) -> Any:
        engine = server.engine
        if op == "ping":
            return {"pid": os.getpid(), "version": engine.version, "paused": engine.gate.paused}
        if op == "manifest":
            return engine.manifest()
        if op == "generate":
            return engine.generate(
                [list(p) for p in args["prompts"]], int(args.get("max_tokens", 16)),
                float(args.get("temperature", 0.0)), args.get("seed"), float(args.get("wait", 60.0)),
            )
        if op == "score":
            return engine.score(list(args["prompt"]), list(args["completion"]), float(args.get("wait", 60.0)))
        if op == "pause":
            engine.pause(float(args.get("timeout", 60.0)))
            return None
        if op == "resume":
            engine.resume(int(args["version"]))
            return None
        if op == "stream_init":
            engine.stream_init(str(args["stream_id"]), str(args["host"]), int(args["port"]), str(args["backend"]),
                               float(args["timeout"]), args["plan"])
            return None
        if op == "stream_receive":
            return engine.stream_receive(str(args["stream_id"]))
        if op == "stream_close":
            engine.stream_close(str(args["stream_id"]))
            return None
        if op == "stats":
            return {**engine.stats, "version": engine.version, "prefix_cache": len(engine.prefix_cache)}
        if op == "shutdown":
            threading.Thread(target=server.shutdown, daemon=True).start()
            return None
        raise ValueError(f"unknown op {op!r}")

    def _reply(self, msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the client went away; nothing to tell
            self.request.sendall(protocol.encode(msg))


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
