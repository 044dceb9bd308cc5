"""CPU tests of the vLLM integration: no vLLM, no CUDA.

The worker extension runs here on a fake worker whose "vLLM model" holds CPU tensors in vLLM's layout, so
its manifest travels over the shm transport and attaches in-process; the HTTP endpoint talks to a local
fake ``vllm serve`` (``http.server`` on 127.0.0.1, ephemeral port).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import torch
from torch import nn

import ipcbridge
from ipcbridge.errors import BridgeError, ManifestError, MappingError
from ipcbridge.manifest import Manifest
from ipcbridge.mapping import plan_from_vllm, to_vllm
from ipcbridge.vllm import WorkerExtension
from ipcbridge.vllm.endpoints import AsyncLLMEndpoint, LLMEndpoint, _check_engine_config, _single
from ipcbridge.vllm.extension import (
    EXTENSION_QUALNAME,
    EngineFacts,
    Reply,
    build_manifest,
    error_reply,
    hf_config_dict,
    model_parameters,
    ok_reply,
    parse_version,
    refusal_reason,
    refusal_reasons,
    unwrap_model,
)
from ipcbridge.vllm.http import HttpEndpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------------------------------
# A fake vLLM worker


def tiny_config(model_type: str = "llama", **kw: Any) -> Any:
    from transformers import AutoConfig

    base = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False)
    base.update(kw)
    return AutoConfig.for_model(model_type, **base)


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


def fake_vllm_config(config: Any, **overrides: Any) -> Any:
    mc = dict(hf_config=config, quantization=None, enable_sleep_mode=False, enable_cumem_allocator=False)
    pc = dict(tensor_parallel_size=1, pipeline_parallel_size=1, worker_extension_cls=EXTENSION_QUALNAME)
    for k, v in overrides.items():
        (mc if k in mc else pc)[k] = v
    return SimpleNamespace(model_config=SimpleNamespace(**mc), parallel_config=SimpleNamespace(**pc))


class FakeWorker(WorkerExtension):
    """vLLM's worker with the extension mixed in, minus vLLM. ``cuda_ok`` pretends the weights are on a GPU."""

    def __init__(self, config: Any, model: nn.Module, cuda_ok: bool = True, **overrides: Any) -> None:
        self.vllm_config = fake_vllm_config(config, **overrides)
        self.model_runner = SimpleNamespace(get_model=lambda: model)
        self.cuda_ok = cuda_ok

    def _ipcbridge_facts(self, model: nn.Module | None = None) -> EngineFacts:
        facts = super()._ipcbridge_facts(model)
        if self.cuda_ok:  # the CPU stand-in for GPU weights
            facts = EngineFacts(**{**facts.__dict__, "weight_devices": ("cuda",)})
        return facts

    def rpc(self, method: str, *args: Any) -> Any:
        return getattr(self, method)(*args)


@pytest.fixture
def config() -> Any:
    return tiny_config()


@pytest.fixture
def worker(config: Any) -> FakeWorker:
    state = {k: t.detach().clone() for k, t in to_vllm(dict(hf_reference(config).state_dict()), config).items()}
    return FakeWorker(config, vllm_module(state))


# ----------------------------------------------------------------------------------------------------
# Import hygiene


def test_import_does_not_import_vllm() -> None:
    code = (
        "import sys, ipcbridge, ipcbridge.vllm, ipcbridge.vllm.extension, ipcbridge.vllm.endpoints, "
        "ipcbridge.vllm.http, ipcbridge.vllm.colocate\n"
        "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stdout + r.stderr


def test_extension_attributes_cannot_clash_with_vllm_worker() -> None:
    # vLLM refuses an extension with any non-dunder attribute its worker already has.
    names = [a for a in dir(WorkerExtension) if not a.startswith("__")]
    assert names and all(a.startswith(("ipcbridge_", "_ipcbridge_")) for a in names)
    qualname = f"{WorkerExtension.__module__.rsplit('.', 1)[0]}.{WorkerExtension.__name__}"
    assert qualname == EXTENSION_QUALNAME


# ----------------------------------------------------------------------------------------------------
# Facts and refusals


def test_facts_from_vllm_config(config: Any) -> None:
    vc = fake_vllm_config(config, quantization="awq", tensor_parallel_size=2, enable_sleep_mode=True)
    f = EngineFacts.from_vllm_config(vc, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert f.quantization == "awq" and f.tensor_parallel_size == 2 and f.enable_sleep_mode
    assert f.model_type == "llama" and "expandable_segments:True" in f.alloc_conf
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineFacts(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="enable_sleep_mode"):
        EngineFacts(enable_sleep_mode="yes")  # type: ignore[arg-type]


def test_no_refusal_for_a_plain_engine() -> None:
    assert refusal_reason(EngineFacts(model_type="llama", weight_devices=("cuda",))) is None
    assert refusal_reason(EngineFacts(model_type="qwen3")) is None


@pytest.mark.parametrize(
    "facts, cause, way_out",
    [
        (EngineFacts(enable_sleep_mode=True), "cumem", "without enable_sleep_mode"),
        (EngineFacts(enable_cumem_allocator=True), "enable_cumem_allocator=True", "pause it instead"),
        (EngineFacts(alloc_conf="expandable_segments:True"), "expandable_segments:True", "expandable_segments:False"),
        (EngineFacts(alloc_conf="garbage_collection_threshold:0.6,expandable_segments:True,"), "expandable", "Unset"),
        (EngineFacts(tensor_parallel_size=2), "tensor_parallel_size=2", "tensor_parallel_size=1"),
        (EngineFacts(pipeline_parallel_size=2), "pipeline_parallel_size=2", "copy-based weight sync"),
        (EngineFacts(quantization="fp8"), "quantization='fp8'", "unquantized"),
        (EngineFacts(quantization="awq"), "awq", "copy-based weight sync"),
        (EngineFacts(model_type="mamba"), "'mamba'", "llama"),
        (EngineFacts(weight_devices=("cpu", "cuda")), "not on the GPU", "cpu_offload_gb=0"),
    ],
)
def test_refusals_name_cause_and_way_out(facts: EngineFacts, cause: str, way_out: str) -> None:
    msg = refusal_reason(facts)
    assert msg is not None and cause in msg and way_out in msg


def test_expandable_segments_last_setting_wins() -> None:
    assert refusal_reason(EngineFacts(alloc_conf="expandable_segments:True,expandable_segments:False")) is None
    assert refusal_reason(EngineFacts(alloc_conf="expandable_segments:False")) is None


def test_all_refusals_are_reported_together() -> None:
    reasons = refusal_reasons(EngineFacts(enable_sleep_mode=True, tensor_parallel_size=4, quantization="gptq"))
    assert len(reasons) == 3


# ----------------------------------------------------------------------------------------------------
# Parameters, config, manifest


def test_model_parameters_keeps_vllm_parameter_objects(worker: FakeWorker) -> None:
    model = worker.model_runner.get_model()
    params = model_parameters(model)
    assert all(isinstance(p, VParam) for p in params.values())
    assert params.keys() == dict(model.named_parameters()).keys()
    # vLLM's CUDA-graph wrappers expose unwrap(); the module under them is exported.
    wrapper = SimpleNamespace(unwrap=lambda: model)
    assert unwrap_model(wrapper) is model
    with pytest.raises(BridgeError, match="not a torch module"):
        unwrap_model(object())
    with pytest.raises(BridgeError, match="no parameters"):
        model_parameters(nn.Module())


def test_hf_config_dict_is_json(config: Any) -> None:
    d = hf_config_dict(SimpleNamespace(hf_config=config))
    assert json.loads(json.dumps(d)) == d
    assert d["model_type"] == "llama" and d["vocab_size"] == 100 and d["num_key_value_heads"] == 2
    with pytest.raises(BridgeError, match="hf_config"):
        hf_config_dict(SimpleNamespace())


def test_manifest_shapes_in_vllm_layout(worker: FakeWorker, config: Any) -> None:
    model = worker.model_runner.get_model()
    m = build_manifest(model_parameters(model), hf_config_dict(worker.vllm_config.model_config), 7)
    m = Manifest.from_json(m.to_json())  # exactly what crosses the channel
    shapes = {t.name: t.shape for t in m.tensors}
    hd, q, kv = 16, 4 * 16, 2 * 16
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (q + 2 * kv, 64)
    assert shapes["model.layers.1.mlp.gate_up_proj.weight"] == (2 * 96, 64)
    assert shapes["model.embed_tokens.weight"] == (128, 64)  # vocab 100 padded to a multiple of 64
    assert shapes["lm_head.weight"] == (128, 64)
    assert m.layout == "vllm" and m.weight_version == 7 and m.config["model_type"] == "llama"
    assert {s.vllm for s in plan_from_vllm(m.names, config)} == set(m.names)
    assert hd * 4 == q


# ----------------------------------------------------------------------------------------------------
# The extension's methods (what collective_rpc calls)


def test_worker_manifest_attaches_and_aliases(worker: FakeWorker, config: Any) -> None:
    manifest = Manifest.from_dict(Reply.from_json(worker.ipcbridge_manifest()).unwrap())
    model = ipcbridge.attach(manifest)
    ref = hf_reference(config)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
        model.lm_head.weight[3].fill_(0.25)  # write through the HF view ...
    vllm_lm = dict(worker.model_runner.get_model().named_parameters())["lm_head.weight"]
    assert torch.all(vllm_lm[3] == 0.25)  # ... lands in the "engine's" tensor


def test_worker_refuses_with_error_reply(config: Any) -> None:
    state = to_vllm(dict(hf_reference(config).state_dict()), config)
    w = FakeWorker(config, vllm_module(state), quantization="awq")
    reply = Reply.from_json(w.ipcbridge_manifest())
    assert not reply.ok and "copy-based weight sync" in reply.error
    with pytest.raises(BridgeError, match="quantized"):
        reply.unwrap()
    # Real CPU weights (no GPU pretence) are refused too: nothing stable to alias.
    w = FakeWorker(config, vllm_module(state), cuda_ok=False)
    with pytest.raises(BridgeError, match="cpu_offload_gb=0"):
        Reply.from_json(w.ipcbridge_manifest()).unwrap()


def test_worker_weight_version_roundtrip(worker: FakeWorker) -> None:
    assert Reply.from_json(worker.ipcbridge_weight_version()).unwrap() == 0
    assert Reply.from_json(worker.ipcbridge_set_weight_version("3")).unwrap() == 3  # HTTP passes strings
    assert Reply.from_json(worker.ipcbridge_set_weight_version(4)).unwrap() == 4
    assert Reply.from_json(worker.ipcbridge_weight_version()).unwrap() == 4
    with pytest.raises(BridgeError, match="decimal"):
        Reply.from_json(worker.ipcbridge_set_weight_version("x")).unwrap()
    m = Manifest.from_dict(Reply.from_json(worker.ipcbridge_manifest()).unwrap())
    assert m.weight_version == 4
    info = Reply.from_json(worker.ipcbridge_info()).unwrap()
    assert info["pid"] == os.getpid() and info["weight_version"] == 4


def test_worker_init_weights_hf_style(worker: FakeWorker) -> None:
    assert Reply.from_json(worker.ipcbridge_init_weights("3", "0.5")).unwrap() > 0
    params = dict(worker.model_runner.get_model().named_parameters())
    assert torch.all(params["model.norm.weight"] == 1.0)
    w = params["model.layers.0.self_attn.qkv_proj.weight"]
    assert 0.4 < float(w.float().std()) < 0.6
    again = {k: v.clone() for k, v in params.items()}
    worker.ipcbridge_init_weights(3, 0.5)  # same seed, same weights
    assert all(torch.equal(again[k], v) for k, v in params.items())


def test_prompt_seeds_never_collide_across_consecutive_calls() -> None:
    from ipcbridge.vllm.endpoints import prompt_seed

    seeds = [prompt_seed(step, i) for step in range(50) for i in range(64)]
    assert len(set(seeds)) == len(seeds)


def test_copy_baseline_load_weights_reports_errors(worker: FakeWorker) -> None:
    reply = Reply.from_json(worker.ipcbridge_load_weights("{not json"))
    assert not reply.ok and reply.error_type == "ManifestError"
    with pytest.raises(ManifestError):
        reply.unwrap()


# ----------------------------------------------------------------------------------------------------
# Replies


def test_reply_roundtrip_and_errors() -> None:
    assert Reply.from_json(ok_reply({"a": [1, 2]})).unwrap() == {"a": [1, 2]}
    with pytest.raises(MappingError, match="boom"):
        Reply.from_json(error_reply(MappingError("boom"))).unwrap()
    with pytest.raises(BridgeError, match="boom"):
        Reply.from_json(error_reply(RuntimeError("boom"))).unwrap()
    with pytest.raises(BridgeError, match="not JSON"):
        Reply.from_json(b"\x82\xa1a")  # msgpack bytes, say
    with pytest.raises(BridgeError, match="not an ipcbridge reply"):
        Reply.from_json(json.dumps({"results": []}))
    with pytest.raises(BridgeError, match="worker_extension_cls"):
        Reply.from_json(None)
    with pytest.raises(BridgeError, match="malformed"):
        Reply.from_json(json.dumps({"format": "ipcbridge.reply", "ok": False}))


def test_parse_version() -> None:
    assert parse_version("12") == 12 and parse_version(0) == 0
    for bad in (-1, "-2", True, 1.5, None, "v1"):
        with pytest.raises(BridgeError):
            parse_version(bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# LLM / AsyncLLM endpoints on fakes


class FakeLLM:
    """The parts of vllm.LLM the endpoint uses; collective_rpc dispatches to a FakeWorker in-process."""

    def __init__(self, worker: FakeWorker, workers: int = 1) -> None:
        self.worker = worker
        self.workers = workers
        self.llm_engine = SimpleNamespace(vllm_config=worker.vllm_config)
        self.calls: list[str] = []

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = ()) -> list[Any]:
        self.calls.append(method)
        return [self.worker.rpc(method, *args)] * self.workers

    def reset_prefix_cache(self) -> bool:
        self.calls.append("reset_prefix_cache")
        return True


def test_check_engine_config(config: Any) -> None:
    with pytest.raises(BridgeError, match=re.escape("worker_extension_cls='ipcbridge.vllm.WorkerExtension'")):
        _check_engine_config(fake_vllm_config(config, worker_extension_cls=""), "vllm.LLM")
    with pytest.raises(BridgeError, match="tensor_parallel_size=1"):
        _check_engine_config(fake_vllm_config(config, tensor_parallel_size=2), "vllm.LLM")
    with pytest.raises(BridgeError, match="answered from 2 workers"):
        _single([ok_reply(1), ok_reply(1)], "ipcbridge_manifest")


def test_llm_endpoint_connect_and_fence(worker: FakeWorker) -> None:
    llm = FakeLLM(worker)
    ep = LLMEndpoint(llm)  # type: ignore[arg-type]
    bridge = ipcbridge.connect(ep)
    assert bridge.model is not None and bridge.weight_version == 0
    llm.calls.clear()
    with bridge.update(), torch.no_grad():
        bridge.model.model.norm.weight.add_(1.0)
    assert llm.calls == ["reset_prefix_cache", "ipcbridge_set_weight_version"]
    assert bridge.weight_version == ep.engine_weight_version() == ep.weight_version == 1
    bridge.close()


def test_llm_endpoint_tp2_refused(worker: FakeWorker) -> None:
    with pytest.raises(BridgeError, match="answered from 2 workers"):
        LLMEndpoint(FakeLLM(worker, workers=2)).manifest()  # type: ignore[arg-type]


class FakeAsyncLLM:
    def __init__(self, worker: FakeWorker) -> None:
        self.worker = worker
        self.vllm_config = worker.vllm_config
        self.output_handler = None
        self.calls: list[str] = []

    async def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = ()) -> list[Any]:
        self.calls.append(method)
        return [self.worker.rpc(method, *args)]

    async def pause_generation(self, mode: str = "abort") -> None:
        self.calls.append(f"pause:{mode}")

    async def reset_prefix_cache(self) -> bool:
        self.calls.append("reset_prefix_cache")
        return True

    async def resume_generation(self) -> None:
        self.calls.append("resume")


def test_async_endpoint_fence_from_a_thread(worker: FakeWorker) -> None:
    engine = FakeAsyncLLM(worker)
    with pytest.raises(BridgeError, match="event loop"):
        AsyncLLMEndpoint(engine)  # no loop yet
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        ep = AsyncLLMEndpoint(engine, loop=loop)
        bridge = ipcbridge.connect(ep)
        engine.calls.clear()
        with bridge.update():
            pass
        assert engine.calls == ["pause:wait", "reset_prefix_cache", "ipcbridge_set_weight_version", "resume"]
        assert ep.engine_weight_version() == bridge.weight_version == 1

        async def on_loop() -> None:
            with pytest.raises(BridgeError, match="to_thread"):
                ep.pause()

        asyncio.run_coroutine_threadsafe(on_loop(), loop).result(10)
        bridge.close()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()


# ----------------------------------------------------------------------------------------------------
# HTTP endpoint against a local fake server


class FakeServe:
    """A fake ``vllm serve``: dev routes (optional), /collective_rpc dispatching to a FakeWorker, and
    switches for failure modes."""

    def __init__(self, worker: FakeWorker | None, dev_mode: bool = True) -> None:
        self.worker = worker
        self.dev_mode = dev_mode
        self.calls: list[str] = []
        self.mode = "ok"  # "ok" | "bad_json" | "slow" | "not_reply" | "rpc_500" | "two_workers"
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self.do_POST()

            def do_POST(self) -> None:
                u = urlparse(self.path)
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                q = {k: v[0] for k, v in parse_qs(u.query).items()}
                fake.calls.append(u.path + ("?" + u.query if u.query else ""))
                if fake.mode == "slow":
                    time.sleep(1.0)
                if fake.mode == "bad_json":
                    return self._send(200, b"<html>not json</html>", "text/html")
                dev = {"/collective_rpc", "/pause", "/resume", "/reset_prefix_cache", "/is_paused"}
                if u.path in dev and not fake.dev_mode:
                    return self._send(404, b'{"detail":"Not Found"}')
                if u.path == "/collective_rpc":
                    if fake.mode == "rpc_500":
                        return self._send(500, b'{"error":"AttributeError: no attribute ipcbridge_manifest"}')
                    if fake.mode == "not_reply":
                        return self._send(200, json.dumps({"results": ["None"]}).encode())
                    r = fake.worker.rpc(body["method"], *body.get("args", []))
                    k = 2 if fake.mode == "two_workers" else 1
                    return self._send(200, json.dumps({"results": [r] * k}).encode())
                if u.path == "/pause":
                    assert q.get("mode") == "wait"
                    return self._send(200, b'{"status":"paused"}')
                if u.path in ("/resume", "/reset_prefix_cache"):
                    return self._send(200, b"")
                return self._send(404, b'{"detail":"Not Found"}')

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that timed out closed its socket: expected in the timeout test

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeServe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_http_connect_and_fence_order(worker: FakeWorker) -> None:
    with FakeServe(worker) as srv:
        bridge = ipcbridge.connect(srv.url)
        assert bridge.endpoint.name == "vllm-http"
        srv.calls.clear()
        with bridge.update():
            pass
        assert srv.calls == ["/pause?mode=wait", "/reset_prefix_cache", "/collective_rpc", "/resume"]
        assert bridge.weight_version == bridge.endpoint.engine_weight_version() == 1
        bridge.close()


def test_http_server_down() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again on exit: nobody listens there
    with pytest.raises(BridgeError, match="cannot reach vllm serve"):
        HttpEndpoint(f"http://127.0.0.1:{port}", timeout=2).manifest()


def test_http_404_without_dev_mode(worker: FakeWorker) -> None:
    with FakeServe(worker, dev_mode=False) as srv:
        ep = HttpEndpoint(srv.url, timeout=5)
        for call in (ep.manifest, ep.pause, lambda: ep.resume(1)):
            with pytest.raises(BridgeError, match="VLLM_SERVER_DEV_MODE=1"):
                call()


def test_http_bad_json(worker: FakeWorker) -> None:
    with FakeServe(worker) as srv:
        srv.mode = "bad_json"
        with pytest.raises(BridgeError, match="not JSON"):
            HttpEndpoint(srv.url, timeout=5).manifest()


def test_http_timeout(worker: FakeWorker) -> None:
    with FakeServe(worker) as srv:
        srv.mode = "slow"
        with pytest.raises(BridgeError, match="timed out"):
            HttpEndpoint(srv.url, timeout=0.2, pause_timeout=0.2).pause()


def test_http_rpc_failures(worker: FakeWorker) -> None:
    with FakeServe(worker) as srv:
        ep = HttpEndpoint(srv.url, timeout=5)
        srv.mode = "rpc_500"
        with pytest.raises(BridgeError, match=re.escape("--worker-extension-cls ipcbridge.vllm.WorkerExtension")):
            ep.manifest()
        srv.mode = "not_reply"
        with pytest.raises(BridgeError, match="not an ipcbridge reply"):
            ep.manifest()
        srv.mode = "two_workers"
        with pytest.raises(BridgeError, match="2 workers"):
            ep.manifest()


def test_http_resume_even_if_version_fails(worker: FakeWorker) -> None:
    with FakeServe(worker) as srv:
        ep = HttpEndpoint(srv.url, timeout=5)
        srv.mode = "not_reply"
        with pytest.raises(BridgeError):
            ep.resume(1)
        assert srv.calls[-1] == "/resume"  # the server is never left paused


def test_http_rejects_non_http_url() -> None:
    with pytest.raises(BridgeError, match="http"):
        HttpEndpoint("localhost:8000")


# ----------------------------------------------------------------------------------------------------
# VllmEngine's config writer (no engine started)


def test_write_model_dir(tmp_path: Any, config: Any) -> None:
    from ipcbridge.vllm.colocate import write_model_dir

    def read(path: str) -> dict:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)

    d = read(write_model_dir(config, str(tmp_path)))
    assert d["architectures"] == ["LlamaForCausalLM"] and d["vocab_size"] == 100
    sub = tmp_path / "q"
    sub.mkdir()
    d = read(write_model_dir({"model_type": "qwen3", "vocab_size": 7}, str(sub)))
    assert d["architectures"] == ["Qwen3ForCausalLM"]
    with pytest.raises(BridgeError, match="model_type"):
        write_model_dir({"vocab_size": 7}, str(sub))
