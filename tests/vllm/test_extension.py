"""The worker side (``ipcbridge.vllm.extension`` and ``.testing``) on a fake worker: what collective_rpc
calls, the manifest it exports, the version it owns, and which extension classes the driver accepts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import ipcbridge
from ipcbridge.errors import BridgeError, ManifestError, MappingError
from ipcbridge.manifest import Manifest
from ipcbridge.mapping import plan_from_vllm
from ipcbridge.vllm import WorkerExtension
from ipcbridge.vllm.extension import (
    EXTENSION_QUALNAME,
    VLLM_HOOKS,
    build_manifest,
    engine_config_dict,
    extension_class,
    is_ipcbridge_extension,
    model_parameters,
    unwrap_model,
)
from ipcbridge.vllm.rpc import decode_reply
from ipcbridge.vllm.testing import TESTING_EXTENSION_QUALNAME, TestingWorkerExtension
from tests.vllm import vllm_fakes as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def value(reply: str) -> Any:
    return decode_reply(reply, "the fake worker")


# ---- import hygiene and vLLM's rules for extensions ---------------------------------------------------


def test_import_does_not_import_vllm() -> None:
    code = (
        "import sys, ipcbridge, ipcbridge.vllm, ipcbridge.vllm.extension, ipcbridge.vllm.endpoints, "
        "ipcbridge.vllm.http, ipcbridge.vllm.colocate, ipcbridge.vllm.testing, ipcbridge.vllm.policy, "
        "ipcbridge.vllm.rpc, ipcbridge.vllm.base\n"
        "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("cls", [WorkerExtension, TestingWorkerExtension])
def test_extension_attributes_cannot_clash_with_vllm_worker(cls: type) -> None:
    # vLLM refuses an extension with any non-dunder attribute its worker already has (Note [every attribute
    # prefixed]); only vLLM 0.33's own hooks are looked up by their bare names.
    names = [a for a in dir(cls) if not a.startswith("__")]
    bare = [a for a in names if not a.startswith(("ipcbridge_", "_ipcbridge_"))]
    assert names and sorted(bare) == sorted(VLLM_HOOKS)


def test_qualnames_name_the_classes() -> None:
    qualname = f"{WorkerExtension.__module__.rsplit('.', 1)[0]}.{WorkerExtension.__name__}"
    assert qualname == EXTENSION_QUALNAME
    assert extension_class(EXTENSION_QUALNAME) is WorkerExtension
    assert extension_class(TESTING_EXTENSION_QUALNAME) is TestingWorkerExtension


def test_production_extension_has_no_test_helpers() -> None:
    for name in ("ipcbridge_init_weights", "ipcbridge_load_weights", "ipcbridge_set_weight_version"):
        assert not hasattr(WorkerExtension, name)
    assert hasattr(TestingWorkerExtension, "ipcbridge_init_weights")
    assert hasattr(TestingWorkerExtension, "ipcbridge_load_weights")


def test_extension_class_accepts_subclasses_only() -> None:
    assert is_ipcbridge_extension(EXTENSION_QUALNAME) and is_ipcbridge_extension(TESTING_EXTENSION_QUALNAME)
    assert is_ipcbridge_extension(TestingWorkerExtension) and is_ipcbridge_extension(F.FakeWorker)
    assert not is_ipcbridge_extension("") and not is_ipcbridge_extension(None)
    assert not is_ipcbridge_extension("collections.OrderedDict")
    assert extension_class("") is None
    with pytest.raises(BridgeError, match=f"cannot import.*{EXTENSION_QUALNAME}"):
        extension_class("no_such_module_xyz.Ext")
    with pytest.raises(BridgeError, match="cannot import"):
        extension_class("ipcbridge.vllm.NoSuchExtension")
    with pytest.raises(BridgeError, match="not name a class"):
        extension_class("ipcbridge.vllm.extension.logger")
    with pytest.raises(BridgeError, match="qualname"):
        extension_class(3)


# ---- parameters, config, manifest --------------------------------------------------------------------


def test_model_parameters_keeps_vllm_parameter_objects(worker: F.FakeWorker) -> None:
    model = worker.model_runner.get_model()
    params = model_parameters(model)
    # the objects themselves: BasevLLMParameters, and RMSNorm's plain Parameters (vllm_fakes.vllm_module)
    assert all(p is getattr(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2])
               for n, p in params.items())
    assert {type(p) for p in params.values()} == {F.VParam, nn.Parameter}
    assert params.keys() == dict(model.named_parameters()).keys()
    # vLLM's CUDA-graph wrappers expose unwrap(); the module under them is exported.
    wrapper = SimpleNamespace(unwrap=lambda: model)
    assert unwrap_model(wrapper) is model
    with pytest.raises(BridgeError, match="not a torch module"):
        unwrap_model(object())
    with pytest.raises(BridgeError, match="no parameters"):
        model_parameters(nn.Module())


def test_engine_config_dict_is_json(config: Any) -> None:
    d = engine_config_dict(SimpleNamespace(hf_config=config))
    assert json.loads(json.dumps(d)) == d
    assert d["model_type"] == "llama" and d["vocab_size"] == 100 and d["num_key_value_heads"] == 2
    with pytest.raises(BridgeError, match="hf_config"):
        engine_config_dict(SimpleNamespace())


def test_manifest_shapes_in_vllm_layout(worker: F.FakeWorker, config: Any) -> None:
    model = worker.model_runner.get_model()
    m = build_manifest(model_parameters(model), engine_config_dict(worker.vllm_config.model_config), 7)
    m = Manifest.from_json(m.to_json())  # exactly what crosses the channel
    shapes = {t.name: t.shape for t in m.tensors}
    hd, q, kv = 16, 4 * 16, 2 * 16
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (q + 2 * kv, 64)
    assert shapes["model.layers.1.mlp.gate_up_proj.weight"] == (2 * 96, 64)
    assert shapes["model.embed_tokens.weight"] == (128, 64)  # vocab 100 padded to a multiple of 64
    assert shapes["lm_head.weight"] == (128, 64)
    assert m.layout == "vllm" and m.weight_version == 7 and m.config["model_type"] == "llama"
    assert {s.target for s in plan_from_vllm(m.names, config)} == set(m.names)
    assert hd * 4 == q


# ---- the extension's methods (what collective_rpc calls) ---------------------------------------------


def test_worker_manifest_attaches_and_aliases(worker: F.FakeWorker, config: Any) -> None:
    manifest = Manifest.from_dict(value(worker.ipcbridge_manifest()))
    model = ipcbridge.attach(manifest)
    ref = F.hf_reference(config)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)
        model.lm_head.weight[3].fill_(0.25)  # write through the HF view ...
    vllm_lm = dict(worker.model_runner.get_model().named_parameters())["lm_head.weight"]
    assert torch.all(vllm_lm[3] == 0.25)  # ... lands in the "engine's" tensor


def test_worker_refuses_with_error_reply(config: Any) -> None:
    state = F.vllm_state(config)
    w = F.FakeWorker(config, F.vllm_module(state), quantization="awq")
    reply = json.loads(w.ipcbridge_manifest())
    assert reply["ok"] is False and "copy-based weight sync" in reply["error"]
    assert reply["error_type"] == "BridgeError"
    with pytest.raises(BridgeError, match="quantized"):
        value(w.ipcbridge_manifest())
    # Real CPU weights (no GPU pretence) are refused too: nothing stable to alias.
    w = F.FakeWorker(config, F.vllm_module(state), cuda_ok=False)
    with pytest.raises(BridgeError, match="cpu_offload_gb=0"):
        value(w.ipcbridge_manifest())


def test_worker_error_keeps_its_type(worker: F.FakeWorker) -> None:
    worker.model_error = MappingError("no table for this model")
    reply = json.loads(worker.ipcbridge_manifest())
    assert reply["ok"] is False and reply["error_type"] == "MappingError"
    with pytest.raises(MappingError, match="no table"):
        value(worker.ipcbridge_info())


def test_worker_owns_the_weight_version(worker: F.FakeWorker) -> None:
    assert value(worker.ipcbridge_weight_version()) == 0
    first = value(worker.ipcbridge_publish_weight_version())
    second = value(worker.ipcbridge_publish_weight_version())
    assert 0 < first < second  # strictly increasing: never reused
    assert (first, second) == (1, 2)
    assert value(worker.ipcbridge_weight_version()) == 2
    m = Manifest.from_dict(value(worker.ipcbridge_manifest()))
    assert m.weight_version == 2
    info = value(worker.ipcbridge_info())
    assert info["pid"] == os.getpid() and info["weight_version"] == 2 and info["refusal"] is None
    assert info["model_class"] == "Module" and info["weight_bytes"] > 0


def test_worker_versions_are_per_worker(config: Any) -> None:
    a, b = F.make_worker(config), F.make_worker(config)
    value(a.ipcbridge_publish_weight_version())
    assert value(b.ipcbridge_weight_version()) == 0  # an instance counter, not the class attribute
    assert WorkerExtension._ipcbridge_weight_version == 0


# ---- the testing extension ---------------------------------------------------------------------------


def test_worker_init_weights_hf_style(worker: F.FakeWorker) -> None:
    assert value(worker.ipcbridge_init_weights("3", "0.5")) > 0
    params = dict(worker.model_runner.get_model().named_parameters())
    assert torch.all(params["model.norm.weight"] == 1.0)
    w = params["model.layers.0.self_attn.qkv_proj.weight"]
    assert 0.4 < float(w.float().std()) < 0.6
    again = {k: v.clone() for k, v in params.items()}
    worker.ipcbridge_init_weights(3, 0.5)  # same seed, same weights
    assert all(torch.equal(again[k], v) for k, v in params.items())
    with pytest.raises(BridgeError, match="std"):
        value(worker.ipcbridge_init_weights(3, "wide"))
    with pytest.raises(BridgeError, match="seed"):
        value(worker.ipcbridge_init_weights("x"))


def test_copy_baseline_load_weights_reports_errors(worker: F.FakeWorker) -> None:
    reply = json.loads(worker.ipcbridge_load_weights("{not json"))
    assert reply["ok"] is False and reply["error_type"] == "ManifestError"
    with pytest.raises(ManifestError):
        value(worker.ipcbridge_load_weights("{not json"))
