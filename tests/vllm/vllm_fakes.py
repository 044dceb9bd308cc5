"""CPU stand-ins for vLLM, shared by the CPU tests of ``ipcbridge.vllm``: no vLLM, no CUDA.

The worker extension runs on a fake worker whose "vLLM model" holds CPU tensors in vLLM's layout, so its
manifest travels over the shm transport and attaches in-process; ``FakeLLM``/``FakeAsyncLLM`` dispatch
``collective_rpc`` to it in-process, and ``FakeServe`` is a local ``vllm serve`` (``http.server`` on
127.0.0.1, ephemeral port). Not a test module (imported as ``vllm_fakes``, like ``vllm_helpers``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch
from torch import nn

from ipcbridge.fence import Fence
from ipcbridge.mapping import to_vllm
from ipcbridge.vllm.policy import EngineFacts
from ipcbridge.vllm.rpc import EXTENSION_QUALNAME
from ipcbridge.vllm.testing import TestingWorkerExtension
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
        m.register_parameter(leaf, VParam(t, requires_grad=False))
    return root


def hf_reference(config: Any, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def vllm_state(config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in to_vllm(dict(hf_reference(config, seed).state_dict()), config).items()}


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


def make_worker(config: Any, **kw: Any) -> FakeWorker:
    return FakeWorker(config, vllm_module(vllm_state(config)), **kw)


def fence_for(endpoint: Any, holder: str = "test bridge") -> Fence:
    """A bridge's fence on ``endpoint``, without a model (the device sync is a no-op on CPU)."""
    return Fence(endpoint, holder=holder, version=endpoint.manifest().weight_version, sync=lambda: None)


# ---- fake engines --------------------------------------------------------------------------------------


class FakeLLM:
    """The parts of vllm.LLM the endpoint uses; collective_rpc dispatches to a FakeWorker in-process.
    ``fail_reset`` makes reset_prefix_cache raise."""

    def __init__(self, worker: FakeWorker, workers: int = 1) -> None:
        self.worker = worker
        self.workers = workers
        self.llm_engine = SimpleNamespace(vllm_config=worker.vllm_config)
        self.calls: list[str] = []
        self.fail_reset = False

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = ()) -> list[Any]:
        self.calls.append(method)
        return [self.worker.rpc(method, *args)] * self.workers

    def reset_prefix_cache(self) -> bool:
        self.calls.append("reset_prefix_cache")
        if self.fail_reset:
            raise RuntimeError("reset_prefix_cache failed")
        return True


class FakeAsyncLLM:
    """The parts of AsyncLLM the endpoint uses (coroutines); ``fail_reset`` makes reset_prefix_cache raise."""

    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self.vllm_config = worker.vllm_config
        self.output_handler = None
        self.calls: list[str] = []
        self.fail_reset = False

    async def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = ()) -> list[Any]:
        self.calls.append(method)
        return [self.worker.rpc(method, *args)]

    async def pause_generation(self, mode: str = "abort") -> None:
        self.calls.append(f"pause:{mode}")

    async def reset_prefix_cache(self) -> bool:
        self.calls.append("reset_prefix_cache")
        if self.fail_reset:
            raise RuntimeError("reset_prefix_cache failed")
        return True

    async def resume_generation(self) -> None:
        self.calls.append("resume")


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

DEV_ROUTES = {"/collective_rpc", "/pause", "/resume", "/reset_prefix_cache", "/is_paused"}


class FakeServe:
    """A fake ``vllm serve``: dev routes (optional), /collective_rpc dispatching to a FakeWorker, and
    switches for failure modes (``mode``: "ok" | "bad_json" | "slow" | "not_reply" | "rpc_500" |
    "two_workers" | "reset_500")."""

    def __init__(self, worker: FakeWorker | None, dev_mode: bool = True) -> None:
        self.worker = worker
        self.dev_mode = dev_mode
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
            return 200, b'{"status":"paused"}'
        if path == "/reset_prefix_cache" and self.mode == "reset_500":
            return 500, b'{"error":"reset failed"}'
        if path in ("/resume", "/reset_prefix_cache"):
            return 200, b""
        return 404, b'{"detail":"Not Found"}'

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
