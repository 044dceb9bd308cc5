"""attach(): an HF model whose parameters are views of vLLM-layout tensors."""

from __future__ import annotations

import pytest
import torch

import ipcbridge
from ipcbridge import BridgeError, MappingError
from ipcbridge.attach import Attachment, attach_with_attachment, verify
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


def _brute_owns(ranges: list[tuple[int, int]], t: torch.Tensor) -> bool:
    """The definition Note [ranges by bisection] must keep: inside one range (never their union)."""
    if t.numel() == 0:
        return True
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    return any(lo <= start and end <= hi for lo, hi in ranges)


def test_owns_means_inside_one_range_even_when_ranges_overlap_or_nest() -> None:
    base = torch.zeros(1000, dtype=torch.uint8)
    a = base.data_ptr()

    def owns(ranges: list[tuple[int, int]], lo: int, hi: int) -> bool:
        return Attachment("vllm", ranges, {}).owns(base[lo:hi])

    overlapping = [(a + 50, a + 200), (a, a + 100)]  # unsorted on purpose
    assert not owns(overlapping, 40, 120)  # inside their union, inside neither
    assert owns(overlapping, 60, 190) and owns(overlapping, 0, 100) and not owns(overlapping, 0, 101)
    nested = [(a + 10, a + 20), (a, a + 500)]
    assert owns(nested, 100, 400) and owns(nested, 12, 18) and not owns(nested, 400, 501)
    assert not owns([], 0, 1) and owns([], 5, 5)  # no memory owns nothing; an empty tensor has no bytes
    assert not owns([(a + 10, a + 20)], 0, 15)  # starts before every range


def test_owns_agrees_with_the_definition_on_random_ranges() -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.zeros(4096, dtype=torch.uint8)
    a = base.data_ptr()

    def rand(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=gen))

    for _ in range(300):
        ranges = [(a + lo, a + lo + rand(800)) for lo in (rand(3000) for _ in range(rand(6)))]
        lo = rand(4000)
        t = base[lo:lo + rand(600)]
        assert Attachment("vllm", ranges, {}).owns(t) == _brute_owns(ranges, t), (ranges, lo, t.numel())


def test_verify_refuses_a_copied_or_retyped_parameter_naming_it() -> None:
    cfg = tiny_config("llama")
    weights = vllm_weights(reference_model(cfg), cfg)
    model, attachment = attach_with_attachment(weights, cfg)
    views = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
    verify(model, attachment, views)  # as attached: fine
    norm = model.model.norm
    norm.weight = torch.nn.Parameter(norm.weight.detach().clone())  # a private copy the engine never sees
    with pytest.raises(BridgeError, match=r"\['model.norm.weight'\] do not lie in the engine's memory"):
        verify(model, attachment, views)
    norm.weight = torch.nn.Parameter(views["model.norm.weight"].double())
    with pytest.raises(BridgeError, match=r"model\.norm\.weight: bound as torch\.float64"):
        verify(model, attachment, views)
    norm.weight = torch.nn.Parameter(torch.empty(64, device="meta"))
    with pytest.raises(BridgeError, match=r"model\.norm\.weight is still on the meta device"):
        verify(model, attachment, views)


def test_a_manifest_whose_tensors_alias_each_other_is_refused_on_the_table_path() -> None:
    # A hostile producer describes o_proj over the first rows of qkv_proj's bytes: each would get the other's
    # update. The table binds names, not bytes, so only the memory check can see it.
    cfg = tiny_config("llama")
    weights = vllm_weights(reference_model(cfg), cfg)
    o = "model.layers.0.self_attn.o_proj.weight"
    qkv = weights["model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv.shape[0] >= weights[o].shape[0] and qkv.shape[1] == weights[o].shape[1]
    weights[o] = qkv[: weights[o].shape[0]]
    with pytest.raises(MappingError, match="overlapping engine memory"):
        ipcbridge.attach(ipcbridge.export(weights, cfg))
