"""attach(): an HF model whose parameters are views of vLLM-layout tensors."""

from __future__ import annotations

import pytest
import torch

import ipcbridge
from ipcbridge import MappingError
from ipcbridge.attach import attach_with_attachment
from tests.helpers import reference_model, tiny_config, vllm_weights

IDS = torch.tensor([[1, 5, 9, 42, 99, 3]])


@pytest.mark.parametrize(("model_type", "tied"), [("llama", False), ("qwen2", False), ("qwen3", True), ("mistral", True)])
def test_logits_equal_reference_and_zero_copy(model_type: str, tied: bool) -> None:
    cfg = tiny_config(model_type, tied=tied)
    ref = reference_model(cfg)
    weights = vllm_weights(ref, cfg)
    model, attachment = attach_with_attachment(weights, cfg)
    assert torch.equal(model(IDS).logits, ref(IDS).logits)
    ranges = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in weights.values()]
    for name, p in model.named_parameters():
        assert not p.is_meta, name
        assert any(lo <= p.data_ptr() < hi for lo, hi in ranges), name
    assert attachment.outside_bytes(model) == 0 and attachment.outside(model) == []
    assert not hasattr(model, "ipcbridge_attachment")  # the bridge owns it, not the HF model
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    # the embedding view drops vLLM's vocab padding (100 -> 128 rows)
    assert weights["model.embed_tokens.weight"].shape[0] == 128
    assert model.model.embed_tokens.weight.shape[0] == 100


def test_buffers_are_real_and_parameters_train_in_place() -> None:
    cfg = tiny_config("llama")
    weights = vllm_weights(reference_model(cfg), cfg)
    qkv = weights["model.layers.0.self_attn.qkv_proj.weight"]
    before = qkv.clone()
    model = ipcbridge.attach(weights, cfg)
    for name, buf in model.named_buffers():
        assert not buf.is_meta, name
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(IDS).logits.logsumexp(-1).sum().backward()
    opt.step()
    q_rows = 4 * 16
    assert not torch.equal(qkv[:q_rows], before[:q_rows])  # q_proj's rows of the fused tensor moved
    assert model.model.layers[0].self_attn.q_proj.weight.data_ptr() == qkv.data_ptr()
    # exactly one parameter per engine tensor block: the optimizer sees each weight once
    assert len(list(model.parameters())) == len(dict(model.named_parameters()))


def test_tied_weight_is_one_parameter_for_the_optimizer() -> None:
    cfg = tiny_config("qwen3", tied=True)
    model = ipcbridge.attach(vllm_weights(reference_model(cfg), cfg), cfg)
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda w: w.pop("model.layers.1.mlp.down_proj.weight"), "missing ['model.layers.1.mlp.down_proj.weight']"),
        (lambda w: w.update({"model.layers.0.mystery.weight": torch.zeros(2)}), "no HF counterpart"),
        (lambda w: w.update({"model.layers.2.mlp.down_proj.weight": torch.zeros(64, 96)}), "unexpected ['model.layers.2"),
        (lambda w: w.update({"model.layers.0.self_attn.qkv_proj.weight": torch.zeros(100, 64)}), "expected 128 rows"),
        (lambda w: w.update({"model.norm.weight": torch.zeros(65)}), "model.norm.weight: the engine's view has shape [65]"),
    ],
)
def test_bad_state_dict_is_named_and_nothing_changes(edit, message: str) -> None:
    cfg = tiny_config("llama")
    weights = vllm_weights(reference_model(cfg), cfg)
    edit(weights)
    snapshot = {k: v.clone() for k, v in weights.items()}
    with pytest.raises(MappingError, match=__import__("re").escape(message)):
        ipcbridge.attach(weights, cfg)
    assert all(torch.equal(snapshot[k], weights[k]) for k in weights)


def test_unknown_architecture_and_missing_config() -> None:
    cfg = tiny_config("llama")
    weights = vllm_weights(reference_model(cfg), cfg)
    with pytest.raises(MappingError, match="unknown architecture 'bert'"):
        ipcbridge.attach(weights, {"model_type": "bert"})
    with pytest.raises(MappingError, match="needs config"):
        ipcbridge.attach(weights)
    bad = {**cfg.to_dict(), "hidden_size": 66, "head_dim": None}
    with pytest.raises(MappingError, match="not a multiple"):
        ipcbridge.attach(weights, bad)


def test_config_as_dict_and_manifest_in_process() -> None:
    cfg = tiny_config("llama")
    ref = reference_model(cfg)
    weights = vllm_weights(ref, cfg)
    m = ipcbridge.export(weights, cfg)
    model = ipcbridge.attach(m)  # the manifest carries cfg.to_dict(); this process opens its own export
    assert torch.equal(model(IDS).logits, ref(IDS).logits)
