"""CPU stand-ins for vLLM, shared by the CPU tests of ``ipcbridge.vllm``: no vLLM, no CUDA.

The worker extension runs on a fake worker whose "vLLM model" holds CPU tensors in vLLM's layout, so its
manifest travels over the shm transport and attaches in-process; ``FakeLLM``/``FakeAsyncLLM`` dispatch
``collective_rpc`` to it in-process, and ``FakeServe`` is a local ``vllm serve`` (``http.server`` on
127.0.0.1, ephemeral port). Not a test module (imported as ``vllm_fakes``, like ``vllm_helpers``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any, TypedDict
from urllib.parse import parse_qs, urlparse

import torch
from torch import nn

from ipcbridge.fence import Fence
from ipcbridge.vllm.features import VllmFeatures
from ipcbridge.vllm.policy import EngineFacts
from ipcbridge.vllm.rpc import EXTENSION_QUALNAME
from ipcbridge.vllm.testing import TestingWorkerExtension
from tests.helpers import reference_model, vllm_weights
from tests.helpers import tiny_config as tiny_config  # re-exported: the config the fakes serve

# ---- a fake vLLM worker -------------------------------------------------------------------------------


class VParam(nn.Parameter):
    """Stands in for vLLM's BasevLLMParameter: an nn.Parameter subclass with its own __torch_function__."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def vllm_module(state: dict[str, torch.Tensor]) -> nn.Module:
    """An nn.Module whose named_parameters() are ``state`` (vLLM names, vLLM layout)."""
    root = nn.Module()
    for name, t in state.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        # vLLM's RMSNorm weight is a plain nn.Parameter, which requires grad (its other weights are
        # BasevLLMParameters that don't): in-place writes into it must run under no_grad (found on the H200).
        plain_norm = t.dim() == 1 and "norm" in leaf + "".join(path[-1:])
        m.register_parameter(leaf, nn.Parameter(t) if plain_norm else VParam(t, requires_grad=False))
    return root


hf_reference = reference_model  # the trainer's HF model, N(0, 0.02)-perturbed so a swapped weight shows


def vllm_state(config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """The engine's weights: ``hf_reference(config, seed)`` in vLLM's layout, as tensors of their own."""
    return vllm_weights(reference_model(config, seed), config)


def fake_vllm_config(config: Any, **overrides: Any) -> Any:
    mc = dict(hf_config=config, quantization=None, enable_sleep_mode=False, enable_cumem_allocator=False)
    pc = dict(tensor_parallel_size=1, pipeline_parallel_size=1, worker_extension_cls=EXTENSION_QUALNAME)
    for k, v in overrides.items():
        (mc if k in mc else pc)[k] = v
    return SimpleNamespace(model_config=SimpleNamespace(**mc), parallel_config=SimpleNamespace(**pc))


class FakeWorker(TestingWorkerExtension):
    """vLLM's worker with the (testing) extension mixed in, minus vLLM. ``cuda_ok`` pretends the weights are
    on a GPU. ``model_error``, when set, is raised inside the worker wherever it reaches for its model."""

    def __init__(self, config: Any, model: nn.Module, cuda_ok: bool = True, **overrides: Any) -> None:
        self.vllm_config = fake_vllm_config(config, **overrides)
        self.model_runner = SimpleNamespace(get_model=lambda: model)
        self.cuda_ok = cuda_ok
        self.model_error: Exception | None = None

    def _ipcbridge_model(self) -> nn.Module:
        if self.model_error is not None:
            raise self.model_error
        return super()._ipcbridge_model()

    def _ipcbridge_facts(self, model: nn.Module | None = None) -> EngineFacts:
        facts = super()._ipcbridge_facts(model)
        if self.cuda_ok:  # the CPU stand-in for GPU weights
            facts = EngineFacts(**{**facts.__dict__, "weight_devices": ("cuda",)})
        return facts

    def rpc(self, method: str, *args: Any) -> Any:
        return getattr(self, method)(*args)

    @property
    def weights_epoch(self) -> float:
        """Changes whenever the served weights change (what a KV block computed now depends on)."""
        return float(sum(p.detach().double().abs().sum() for p in self._ipcbridge_model().parameters()))


def make_worker(config: Any, **kw: Any) -> FakeWorker:
    return FakeWorker(config, vllm_module(vllm_state(config)), **kw)


def fence_for(endpoint: Any, holder: str = "test bridge", manifest: bool = True) -> Fence:
    """A bridge's fence on ``endpoint``, without a model (the device sync is a no-op on CPU). ``manifest=False``
    skips asking for the manifest, so an in-process engine's worker still counts the versions itself (Note [an
    in-process engine's version is counted here])."""
    version = endpoint.manifest().weight_version if manifest else 0
    return Fence(endpoint, holder=holder, version=version, sync=lambda: None)


# ---- fake engines, one behaviour per vLLM release -------------------------------------------------------
#
# ``release`` picks what each fake reproduces (read from each release's wheel; docs/vllm.md has the table):
#   0.25  LLM/AsyncLLM.reset_prefix_cache -> bool; POST /reset_prefix_cache -> empty body
#   0.26  POST /reset_prefix_cache -> {"success": bool}
#   0.27  update_weight_version(str) / get_weight_version(); POST /update_weight_version, GET /weight_info
#   0.28  (the trainer-side NCCL API: the streaming issue's, nothing here)
#   0.29  Model Runner V2 by default (get_model() on both runners); a clear_cache pause syncs the device first
#   0.31  a clear_cache pause raises if the cache reset fails
#   0.32  CompletionOutput.weight_versions (per-token spans); wait_for_inflight_requests removed
#   0.33  a pause in mode abort/wait rejects new requests (retryable; HTTP 503) until resume; the core's
#         pause coroutine is pause_generation_async; worker-extension hooks

RELEASES = ("0.25", "0.26", "0.27", "0.28", "0.29", "0.31", "0.32", "0.33")


def at_least(release: str, version: str) -> bool:
    if release not in RELEASES:
        raise ValueError(f"no fake of vLLM {release}; one of {RELEASES}")
    return tuple(map(int, release.split("."))) >= tuple(map(int, version.split(".")))


class RetryableRequestError(RuntimeError):
    """vLLM 0.33's error for a request refused during a pause (HTTP 503 under vllm serve)."""


@dataclass
class CompletionOutput025:
    """vllm.outputs.CompletionOutput before 0.32 (the fields the endpoints read)."""

    token_ids: list[int]
    logprobs: list[dict[int, Any]] | None


@dataclass
class WeightVersionSpan:
    version: str
    start: int
    end: int


@dataclass
class CompletionOutput032(CompletionOutput025):
    weight_versions: list[WeightVersionSpan] | None = None


class TokensPrompt(TypedDict, total=False):
    """vllm.inputs.TokensPrompt (0.25.1+: has cache_salt)."""

    prompt_token_ids: list[int]
    cache_salt: str


def completion_class(release: str) -> type:
    return CompletionOutput032 if at_least(release, "0.32") else CompletionOutput025


class FakePrefixCache:
    """vLLM's prefix cache, reduced to what the fence must get right: a block filled under one set of
    weights and hit under another is *stale*. Keyed like vLLM's first-block hash: (cache_salt, prompt)."""

    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self.blocks: dict[tuple[str | None, tuple[int, ...]], int] = {}
        self.hits = 0
        self.stale_hits = 0
        self.fail = False  # blocks still held: reset_prefix_cache returns False

    def lookup(self, prompt: dict[str, Any]) -> None:
        key = (prompt.get("cache_salt"), tuple(prompt["prompt_token_ids"]))
        weights = self.worker.weights_epoch
        if key in self.blocks:
            self.hits += 1
            self.stale_hits += self.blocks[key] != weights
        else:
            self.blocks[key] = weights

    def reset(self) -> bool:
        if self.fail:
            return False
        self.blocks.clear()
        return True


def _fake_completion(release: str, prompt: dict[str, Any], n: int, version: str) -> Any:
    tokens = [(sum(prompt["prompt_token_ids"]) + i) % 97 for i in range(n)]
    lps = [{t: SimpleNamespace(logprob=-0.5)} for t in tokens]
    if at_least(release, "0.32"):
        return CompletionOutput032(tokens, lps, [WeightVersionSpan(version, 0, n)])
    return CompletionOutput025(tokens, lps)


class _FakeEngineBase:
    """What LLM and AsyncLLM fakes share: the worker, the prefix cache, vLLM's own weight version."""

    def __init__(self, worker: FakeWorker, release: str) -> None:
        at_least(release, "0.25")
        self.worker = worker
        self.release = release
        self.calls: list[str] = []
        self.fail_reset = False  # reset_prefix_cache raises
        self.prefix_cache = FakePrefixCache(worker)
        self.vllm_weight_version = "0"
        self.prompts: list[dict[str, Any]] = []
        if at_least(release, "0.27"):  # present only from 0.27, as hasattr sees it
            self.update_weight_version = self._update_weight_version
            self.get_weight_version = self._get_weight_version

    def _reset(self) -> bool:
        self.calls.append("reset_prefix_cache")
        if self.fail_reset:
            raise RuntimeError("reset_prefix_cache failed")
        return self.prefix_cache.reset()

    def _generate_one(self, prompt: dict[str, Any], max_tokens: int) -> Any:
        self.prompts.append(prompt)
        self.prefix_cache.lookup(prompt)
        c = _fake_completion(self.release, prompt, max_tokens, self.vllm_weight_version)
        return SimpleNamespace(outputs=[c])

    def _update_weight_version(self, new_version: str) -> Any:
        self.calls.append(f"update_weight_version:{new_version}")
        self.vllm_weight_version = new_version
        return None

    def _get_weight_version(self) -> str:
        return self.vllm_weight_version


class FakeLLM(_FakeEngineBase):
    """The parts of vllm.LLM the endpoint uses, as of ``release``; collective_rpc dispatches to a FakeWorker
    in-process. ``fail_reset`` makes reset_prefix_cache raise; ``prefix_cache.fail`` makes it return False."""

    def __init__(self, worker: FakeWorker, workers: int = 1, release: str = "0.25") -> None:
        super().__init__(worker, release)
        self.workers = workers
        self.llm_engine = SimpleNamespace(vllm_config=worker.vllm_config)

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = ()) -> list[Any]:
        self.calls.append(method)
        return [self.worker.rpc(method, *args)] * self.workers

    def reset_prefix_cache(self) -> bool:
        return self._reset()

    def generate(self, prompts: list[dict[str, Any]], params: list[Any], use_tqdm: bool = True) -> list[Any]:
        return [self._generate_one(p, 4) for p in prompts]


class FakeAsyncLLM(_FakeEngineBase):
    """The parts of AsyncLLM the endpoint uses (coroutines), as of ``release``. ``fail_reset`` makes
    reset_prefix_cache raise. Its engine core has the pause coroutine(s) of that release; the public
    ``pause_generation`` ends with vLLM's 20 ms settle sleep, and records it."""

    def __init__(self, worker: FakeWorker, release: str = "0.25") -> None:
        super().__init__(worker, release)
        self.vllm_config = worker.vllm_config
        self.output_handler = None
        self.paused = ""
        core: dict[str, Any] = {"pause_scheduler_async": self._core_pause("pause_scheduler_async")}
        if at_least(release, "0.33"):
            core["pause_generation_async"] = self._core_pause("pause_generation_async")
        self.engine_core = SimpleNamespace(**core)

    def _core_pause(self, name: str) -> Callable[..., Any]:
        async def pause(mode: str = "abort", clear_cache: bool = True) -> None:
            self.calls.append(f"core.{name}:{mode}:clear_cache={clear_cache}")
            await self._pause(mode, clear_cache, rejects=name == "pause_generation_async")

        return pause

    async def _pause(self, mode: str, clear_cache: bool, rejects: bool) -> None:
        if mode not in ("abort", "wait", "keep"):
            raise ValueError(f"Invalid pause mode: {mode}")
        self.paused = "reject" if rejects and mode != "keep" else "queue"
        if clear_cache and not self._reset() and at_least(self.release, "0.31"):
            raise RuntimeError("pause_generation(clear_cache=True): failed to reset the prefix cache")

    async def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = ()) -> list[Any]:
        self.calls.append(method)
        return [self.worker.rpc(method, *args)]

    async def pause_generation(self, *, mode: str = "abort", clear_cache: bool = True, **kw: Any) -> None:
        if kw and (at_least(self.release, "0.32") or set(kw) != {"wait_for_inflight_requests"}):
            raise TypeError(f"pause_generation() got unexpected keyword arguments {sorted(kw)}")
        self.calls.append(f"pause:{mode}:clear_cache={clear_cache}")
        await self._pause(mode, clear_cache, rejects=at_least(self.release, "0.33"))
        await asyncio.sleep(0.02)
        self.calls.append("settle-sleep")

    async def reset_prefix_cache(self) -> bool:
        return self._reset()

    async def resume_generation(self) -> None:
        self.paused = ""
        self.calls.append("resume")

    def _update_weight_version(self, new_version: str) -> Any:
        super()._update_weight_version(new_version)
        return asyncio.sleep(0)  # AsyncLLM's is a coroutine

    async def generate(self, prompt: dict[str, Any], params: Any, request_id: str = "") -> Any:
        if self.paused == "reject":
            raise RetryableRequestError("the engine is paused; retry after resume")
        while self.paused:
            await asyncio.sleep(0.001)
        yield self._generate_one(prompt, getattr(params, "max_tokens", 4))


def features_of(fake: Any) -> VllmFeatures:
    """What the endpoint probes from ``fake``, with the fake vLLM classes of its release."""
    return VllmFeatures.probe(fake, fake.worker.vllm_config, completion_class(fake.release), TokensPrompt)


class LoopThread:
    """An event loop running in a daemon thread (the engine's loop, as AsyncLLM has it)."""

    def __init__(self) -> None:
        import asyncio

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Any:
        self.thread.start()
        return self.loop

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# ---- a fake `vllm serve` -------------------------------------------------------------------------------

DEV_ROUTES = {"/collective_rpc", "/pause", "/resume", "/reset_prefix_cache", "/is_paused", "/weight_info",
              "/update_weight_version"}


class FakeServe:
    """A fake ``vllm serve`` of ``release``: dev routes (optional), /collective_rpc dispatching to a
    FakeWorker, /v1/completions, and switches for failure modes (``mode``: "ok" | "bad_json" | "slow" |
    "not_reply" | "rpc_500" | "two_workers" | "reset_500" | "reset_false")."""

    def __init__(self, worker: FakeWorker | None, dev_mode: bool = True, release: str = "0.25") -> None:
        at_least(release, "0.25")
        self.worker = worker
        self.dev_mode = dev_mode
        self.release = release
        self.paused = False
        self.vllm_weight_version = "0"
        self.completion_bodies: list[dict[str, Any]] = []
        self.calls: list[str] = []
        self.mode = "ok"
        self.server = _Server(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, path: str, query: dict[str, str], body: Any) -> tuple[int, bytes]:
        """(status, body) of one request; the fake server's whole behaviour."""
        if self.mode == "slow":
            time.sleep(1.0)
        if self.mode == "bad_json":
            return 200, b"<html>not json</html>"
        if path in DEV_ROUTES and not self.dev_mode:
            return 404, b'{"detail":"Not Found"}'
        if path == "/collective_rpc":
            if self.mode == "rpc_500":
                return 500, b'{"error":"AttributeError: no attribute ipcbridge_manifest"}'
            if self.mode == "not_reply":
                return 200, json.dumps({"results": ["None"]}).encode()
            assert self.worker is not None
            r = self.worker.rpc(body["method"], *body.get("args", []))
            k = 2 if self.mode == "two_workers" else 1
            return 200, json.dumps({"results": [r] * k}).encode()
        if path == "/pause":
            assert query.get("mode") == "wait"
            self.paused = True
            return 200, b'{"status":"paused"}'
        if path == "/resume":
            self.paused = False
            return 200, b""
        if path == "/reset_prefix_cache":
            return self._reset()
        if path in ("/weight_info", "/update_weight_version") and at_least(self.release, "0.27"):
            if path == "/update_weight_version":
                self.vllm_weight_version = str(body["new_version"])
            return 200, json.dumps({"weight_version": self.vllm_weight_version}).encode()
        if path == "/v1/models":
            return 200, b'{"data":[{"id":"fake"}]}'
        if path == "/v1/completions":
            return self._complete(body)
        return 404, b'{"detail":"Not Found"}'

    def _reset(self) -> tuple[int, bytes]:
        if self.mode == "reset_500":
            return 500, b'{"error":"reset failed"}'
        if not at_least(self.release, "0.26"):
            return 200, b""
        return 200, json.dumps({"success": self.mode != "reset_false"}).encode()

    def _complete(self, body: dict[str, Any]) -> tuple[int, bytes]:
        if self.paused and at_least(self.release, "0.33"):
            return 503, b'{"error":{"message":"the engine is paused; retry","code":503}}'
        self.completion_bodies.append(body)
        tokens = [(sum(body["prompt"]) + i) % 97 for i in range(body["max_tokens"])]
        choice = {"token_ids": tokens, "logprobs": {"token_logprobs": [-0.5] * len(tokens)}}
        return 200, json.dumps({"choices": [choice]}).encode()

    def __enter__(self) -> FakeServe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out closed its socket: expected in the timeout test


def _handler(fake: FakeServe) -> Callable[..., BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.do_POST()

        def do_POST(self) -> None:
            u = urlparse(self.path)
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else None
            q = {k: v[0] for k, v in parse_qs(u.query).items()}
            fake.calls.append(u.path + ("?" + u.query if u.query else ""))
            code, payload = fake.answer(u.path, q, body)
            self.send_response(code)
            self.send_header("Content-Type", "text/html" if fake.mode == "bad_json" else "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler
