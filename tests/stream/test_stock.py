"""Streaming into vLLM's own NCCL receiver: the packing byte-exact against vLLM's code (transcribed in
``vllm_transcript``), the update/init info per release, and the fence and fault paths over gloo with a fake
stock engine whose worker runs that transcription."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from ipcbridge.errors import BridgeError, ManifestError
from ipcbridge.stream.api import open_stock
from ipcbridge.stream.controls import StockControl
from ipcbridge.stream.group import TorchGroup, client_store, master_store
from ipcbridge.stream.nccl import _bounded, unique_id_b64
from ipcbridge.stream.plan import Bucket, Slot, StreamPlan, plan_vllm_chunks
from ipcbridge.stream.protocol import READY_KEY, send
from ipcbridge.stream.stock import StockStreamBridge, StockWire, hf_specs, parse_version
from tests.helpers import tiny_config
from tests.stream import vllm_transcript as vt

# ---- the packing rule, byte-exact ------------------------------------------------------------------------


class Done:
    def wait(self) -> bool:
        return True


class Recorder:
    """A sender's group that keeps a copy of every broadcast, in order."""

    rank = 0

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []

    def broadcast(self, tensor: torch.Tensor, src: int) -> Done:
        self.chunks.append(tensor.clone())
        return Done()


class Replay:
    """A receiver's group that hands out recorded broadcasts; a size mismatch is a wire incompatibility."""

    rank = 1

    def __init__(self, chunks: list[torch.Tensor]) -> None:
        self.chunks = list(chunks)

    def broadcast(self, tensor: torch.Tensor, src: int) -> Done:
        chunk = self.chunks.pop(0)
        assert tensor.numel() == chunk.numel(), f"receiver posted {tensor.numel()} bytes, sender sent {chunk.numel()}"
        tensor.copy_(chunk)
        return Done()


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i, (dtype, shape) in enumerate([(torch.float32, (5, 3)), (torch.bfloat16, (7, 4)), (torch.bfloat16, (1,)),
                                        (torch.bfloat16, (3,)), (torch.float16, (2, 2, 2)), (torch.bfloat16, (0,)),
                                        (torch.bfloat16, (33,)), (torch.bfloat16, (16, 16))]):
        out[f"model.t{i}.weight"] = torch.randn(shape, generator=g).to(dtype)
    return out


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def ours(named: dict[str, torch.Tensor], buffer_bytes: int) -> tuple[StreamPlan, list[torch.Tensor]]:
    plan = plan_vllm_chunks(named, buffer_bytes)
    rec = Recorder()
    send(rec, named, plan)
    return plan, rec.chunks


TOTAL = sum(t.numel() * t.element_size() for t in tensors().values())
# 1: every tensor passes it alone; 60: the first tensor exactly fills it (no cut: vLLM cuts on >, not >=);
# 62: the second tensor crosses it; TOTAL - 1 / TOTAL / huge: one or two chunks.
SIZES = [1, 60, 62, 64, 100, 128, 513, TOTAL - 1, TOTAL, 1 << 30]


@pytest.mark.parametrize("buffer_bytes", SIZES)
def test_chunks_are_byte_identical_to_vllms_producer(buffer_bytes: int) -> None:
    named = tensors()
    _, mine = ours(named, buffer_bytes)
    rec = Recorder()
    vt.producer(iter(named.items()), rec, 0, buffer_bytes)
    assert [c.numel() for c in mine] == [c.numel() for c in rec.chunks]
    for a, b in zip(mine, rec.chunks, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("buffer_bytes", SIZES)
def test_vllms_consumer_unpacks_our_stream(buffer_bytes: int) -> None:
    named = tensors(1)
    plan, chunks = ours(named, buffer_bytes)
    info = StockWire((0, 25), buffer_bytes=buffer_bytes).update_info(plan)
    loaded: dict[str, torch.Tensor] = {}

    def load_weights(pairs: list[tuple[str, torch.Tensor]]) -> None:
        for n, t in pairs:
            loaded[n] = t.clone()

    replay = Replay(chunks)
    vt.consumer(vt.update_info_iterator(info), replay, 0, load_weights, info["packed_buffer_size_bytes"])
    assert not replay.chunks, "the consumer did not take every chunk"
    assert list(loaded) == list(named)
    for n, t in named.items():
        assert loaded[n].dtype == t.dtype and loaded[n].shape == t.shape
        assert torch.equal(as_bytes(loaded[n]), as_bytes(t))


def test_a_chunk_is_cut_after_the_tensor_that_passes_the_buffer() -> None:
    plan = plan_vllm_chunks([("a", "float32", [4]), ("b", "float32", [4]), ("c", "float32", [1])], 16)
    assert [b.names for b in plan.buckets] == [["a", "b"], ["c"]]  # 16 is not past 16; 32 is
    assert [s.offset for s in plan.buckets[0].slots] == [0, 16]
    assert plan.buffer_bytes == 32 and plan.wire_bytes == 36


def test_an_order_vllm_cannot_view_is_refused_before_sending() -> None:
    named = {"odd": torch.ones(3, dtype=torch.bfloat16), "f32": torch.ones(2)}  # f32 at byte 6
    with pytest.raises(ManifestError, match="element size"):
        plan_vllm_chunks(named, 1 << 20)
    rec = Recorder()
    vt.producer(iter(named.items()), rec, 0, 1 << 20)
    info = {"names": ["odd", "f32"], "dtype_names": ["bfloat16", "float32"], "shapes": [[3], [2]]}
    with pytest.raises(RuntimeError, match="divisible"):  # vLLM's own receiver would fail on it
        vt.consumer(vt.update_info_iterator(info), Replay(rec.chunks), 0, lambda p: None, 1 << 20)


def test_vllm_plans_validate_and_round_trip() -> None:
    plan = plan_vllm_chunks(tensors(), 64)
    assert StreamPlan.from_json(plan.to_json()) == plan
    s = Slot("a", "float32", (4,), 0, 16)
    with pytest.raises(ManifestError, match="no gap"):
        StreamPlan((Bucket((s, Slot("b", "float32", (4,), 32, 16))),), 64, alignment=1, packing="vllm")
    with pytest.raises(ManifestError, match="would not cut"):
        StreamPlan((Bucket((s,)), Bucket((Slot("b", "float32", (4,), 0, 16),))), 64, alignment=1, packing="vllm")
    with pytest.raises(ManifestError, match="continues"):
        StreamPlan((Bucket((s, Slot("b", "float32", (4,), 16, 16))),), 8, alignment=1, packing="vllm")
    with pytest.raises(ManifestError, match="alignment"):
        StreamPlan((Bucket((s,)),), 64, alignment=256, packing="vllm")
    with pytest.raises(ManifestError, match="packing"):
        StreamPlan((Bucket((s,)),), 64, packing="tight")
    d = plan_vllm_chunks(tensors(), 64).to_dict()
    with pytest.raises(ManifestError):  # without "packing" a plan reads as ours, which these offsets break
        StreamPlan.from_dict({k: v for k, v in d.items() if k != "packing"})


# ---- the info dicts, per release -------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "fields"), [("0.25.1", (0, 25)), ("0.26.0", (0, 25)), ("0.27.1", (0, 25)),
                                                 ("0.28.0", (0, 28)), ("0.29.0", (0, 28)), ("0.30.0", (0, 30)),
                                                 ("0.33.0rc1+cu130", (0, 30))])
def test_init_and_update_info_match_each_release(version: str, fields: tuple[int, int]) -> None:
    wire = StockWire(parse_version(version), buffer_bytes=1 << 20)
    plan = plan_vllm_chunks(tensors(), 1 << 20)
    update = wire.update_info(plan)
    assert set(update) == vt.UPDATE_FIELDS[fields]
    assert [getattr(torch, n) for n in update["dtype_names"]] == [s.torch_dtype for s in plan.slots]
    if wire.unique_id:
        init = wire.init_info(3, uid_b64=unique_id_b64(bytes(range(128))))
        assert "master_address" not in init and len(init["nccl_unique_id_b64"]) == 172
    else:
        init = wire.init_info(3, master_address="127.0.0.1", master_port=1234)
    assert set(init) <= vt.INIT_FIELDS[fields] and init["rank_offset"] == 1 and init["world_size"] == 3
    geometry = init if fields >= (0, 28) else update
    assert (geometry["packed"], geometry["packed_buffer_size_bytes"], geometry["packed_num_buffers"]) == (True, 1 << 20, 2)


def test_releases_without_the_nccl_transfer_are_refused() -> None:
    with pytest.raises(BridgeError, match=r">= 0\.25\.1"):
        StockWire(parse_version("0.24.0"))
    with pytest.raises(BridgeError, match="version"):
        parse_version("nightly")


# ---- the fence and the faults, over gloo -----------------------------------------------------------------


class FakeStockEngine(StockControl):
    """A stock vLLM engine in this process: its "worker" follows vLLM's lifecycle and receives with the
    transcribed consumer, over gloo. ``fail``: where to misbehave."""

    name = "fake-stock"

    def __init__(self, weights: dict[str, torch.Tensor], version: str = "0.25.1", fail: str = "") -> None:
        self.weights = weights
        self.gate_key = self
        self._version = version
        self.fail = fail
        self.group: TorchGroup | None = None
        self.active = False
        self.calls: list[str] = []
        self.resumes = 0
        self.unstick = threading.Event()

    def world_size(self) -> int:
        return 1

    def version(self) -> str:
        return self._version

    def engine_pause(self) -> None:
        self.calls.append("pause")

    def reset_prefix_cache(self) -> bool:
        return self.fail != "reset"

    def resume_generation(self) -> None:
        self.resumes += 1

    def call(self, method: str, payload: dict[str, Any] | None) -> None:
        self.calls.append(method)
        try:
            getattr(self, "_" + method)(**(payload or {}))
        except BridgeError:
            raise
        except Exception as e:  # as the controls report a worker's error
            raise BridgeError(f"vLLM's {method} failed: {type(e).__name__}: {e}") from e

    def _init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        if self.fail == "init":
            raise RuntimeError("weight transfer is not configured")
        store = client_store(init_info["master_address"], init_info["master_port"], 10)
        store.set(READY_KEY, "1")
        self.group = TorchGroup.join(store, 1, 2, "gloo", 10)

    def _start_weight_update(self) -> None:
        if self.fail == "start" or self.active:
            raise RuntimeError("start_weight_update called while a weight update is already active")
        self.active = True

    def _load_weights(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        for n, t in pairs:
            self.weights[n].copy_(t)  # an unknown name: KeyError, as vLLM's load_weights
        if self.fail == "die":
            self.group.close()  # the worker's sockets go with it
            raise RuntimeError("worker died")

    def _update_weights(self, update_info: dict[str, Any]) -> None:
        assert self.active, "start_weight_update must be called before update_weights"
        if self.fail == "stuck":
            self.unstick.wait(30)
            return
        try:
            vt.consumer(vt.update_info_iterator(update_info), self.group, 0, self._load_weights,
                        update_info["packed_buffer_size_bytes"])
        except BaseException:
            self.active = False
            raise

    def _finish_weight_update(self) -> None:
        self.active = False


class GlooStockBridge(StockStreamBridge):
    """The stock bridge with a gloo group in place of vLLM's NCCL one (no GPU here); all else unchanged. The
    join starts only once the fake engine has accepted init (as the LocalEngine stream does), so a refused
    init leaves no thread blocked in gloo's rendezvous behind."""

    def _rendezvous(self, world: int):  # type: ignore[no-untyped-def]
        store = master_store("127.0.0.1", self.timeout)
        info = self.wire.init_info(world, master_address="127.0.0.1", master_port=store.port)

        def join(refused):  # type: ignore[no-untyped-def]
            while not store.check([READY_KEY]):
                if refused() is not None:
                    raise BridgeError(f"the engine refused: {refused()}")
                time.sleep(0.005)
            return _bounded(lambda: TorchGroup.join(store, 0, 2, "gloo", self.timeout), self.timeout,
                            "joining the group", refused)

        return info, join


def trainer_model(tied: bool = False, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("qwen2" if tied else "llama", tied=tied))


def engine_for(model, **kw: Any) -> FakeStockEngine:
    return FakeStockEngine({n: torch.zeros_like(p) for n, p in model.named_parameters()}, **kw)


def open_bridge(engine: FakeStockEngine, model, timeout: float = 10.0, bucket_bytes: int = 4096) -> StockStreamBridge:
    return open_stock(engine, model, bucket_bytes=bucket_bytes, timeout=timeout, host="127.0.0.1", lease_seconds=30,
                      wait=5, bridge_cls=GlooStockBridge)


def assert_engine_has(engine: FakeStockEngine, model) -> None:
    params = dict(model.named_parameters())
    assert engine.weights.keys() == params.keys()
    for n, p in params.items():
        assert torch.equal(engine.weights[n], p.detach()), n


@pytest.mark.parametrize("tied", [False, True])
def test_a_fenced_step_reaches_the_stock_engine(tied: bool) -> None:
    model = trainer_model(tied)
    engine = engine_for(model)
    with open_bridge(engine, model) as sb:
        assert len(sb.plan.buckets) > 2 and sb.plan.packing == "vllm"
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
        with sb.update():
            opt.step()
        assert_engine_has(engine, model)
        assert engine.calls == ["init_weight_transfer_engine", "pause", "start_weight_update", "update_weights",
                                "finish_weight_update"]
        assert sb.weight_version == 1 and engine.resumes == 1
        sb.push()
        assert sb.weight_version == 2 and sb.stats()["receiver"] == "vllm"


def test_the_engine_refusing_init_is_reported_at_once() -> None:
    model = trainer_model()
    t0 = time.monotonic()
    with pytest.raises(BridgeError, match="weight transfer is not configured"):
        open_bridge(engine_for(model, fail="init"), model, timeout=20)
    assert time.monotonic() - t0 < 5


def test_a_refused_start_resumes_the_engine_and_the_stream_survives() -> None:
    model = trainer_model()
    engine = engine_for(model, fail="start")
    with open_bridge(engine, model) as sb:
        with pytest.raises(BridgeError, match="start_weight_update"):
            sb.push()
        assert engine.resumes == 1 and "update_weights" not in engine.calls
        engine.fail = ""
        sb.push()  # nothing was sent: the group is still in step
        assert_engine_has(engine, model)


def test_a_failed_reset_is_reported_after_the_weights_landed_and_the_engine_resumed() -> None:
    model = trainer_model()
    engine = engine_for(model, fail="reset")
    with open_bridge(engine, model) as sb:
        with pytest.raises(BridgeError, match="reset_prefix_cache reported failure"):
            sb.push()
        assert engine.resumes == 1 and engine.weight_version == 1  # counted: the weights did change
        assert_engine_has(engine, model)
        engine.fail = ""
        sb.push()
        assert sb.weight_version == 2


def test_an_engine_dying_mid_push_gives_bridgeerror_quickly_and_resumes_it() -> None:
    model = trainer_model()
    engine = engine_for(model, fail="die")
    sb = open_bridge(engine, model, timeout=20)
    t0 = time.monotonic()
    with pytest.raises(BridgeError, match="worker died"):
        sb.push()
    assert time.monotonic() - t0 < 10
    assert engine.resumes == 1 and not engine.active  # the engine serves on, at a new version
    with pytest.raises(BridgeError, match="closed"):
        sb.push()
    sb.close()
    engine.fail = ""
    with open_bridge(engine, model) as again:  # a new stream works
        again.push()
    assert_engine_has(engine, model)


@pytest.mark.slow
def test_a_stuck_engine_gives_bridgeerror_within_the_timeout() -> None:
    model = trainer_model()
    engine = engine_for(model, fail="stuck")
    sb = open_bridge(engine, model, timeout=2)
    t0 = time.monotonic()
    try:
        with pytest.raises(BridgeError, match="streaming weights to vLLM failed"):
            sb.push()
        assert time.monotonic() - t0 < 10
        assert engine.resumes == 1
    finally:
        engine.unstick.set()
        sb.close()


def test_plan_mismatches_are_refused() -> None:
    model = trainer_model()
    engine = engine_for(model)
    del engine.weights["model.norm.weight"]  # the engine does not know a tensor the trainer sends
    with open_bridge(engine, model) as sb, pytest.raises(BridgeError, match=r"model\.norm\.weight"):
        sb.push()
    engine = engine_for(model)
    with open_bridge(engine, model) as sb:
        with torch.no_grad():
            model.model.norm.weight = torch.nn.Parameter(torch.ones(7))
        calls = list(engine.calls)
        with pytest.raises(BridgeError, match=r"model\.norm\.weight"):
            sb.push()
        assert engine.calls == calls  # refused before the engine was paused


def test_hf_specs_send_a_tied_tensor_once() -> None:
    model = trainer_model(tied=True)
    names = [n for n, _, _ in hf_specs(model)]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
