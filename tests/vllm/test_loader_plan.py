"""Alias plans derived from a loader: the recorder driven by loaders written like vLLM's
(``stacked_params_mapping`` loops, vocab padding, fused experts unbound per expert), cross-checked against
every table it can reproduce, refusing what is no view, and attaching a table-less architecture."""

from __future__ import annotations

import pytest
import torch

import ipcbridge
from ipcbridge import mapping
from ipcbridge.errors import ManifestError, MappingError
from ipcbridge.mapping.derived import Landing, LoaderPlan, differences, table_plan
from ipcbridge.mapping.rotary import permute_rotary
from ipcbridge.mapping.spec import qkv_sizes
from ipcbridge.vllm.loader_plan import hf_parameters, record_loader_plan
from tests.mapping.mapping_cases import built, reference_model, token_ids

STACKED = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
           ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]


def vllm_like_loader(params: dict[str, torch.nn.Parameter], config, transform=lambda n, w: w):
    """``load_weights`` as vLLM writes it: stacked params narrowed by shard, fused experts unbound per
    expert into w13/w2 (routed_experts.py), vocab rows copied and the padding zeroed, the rest copied."""
    qkv = qkv_sizes(config)

    def load_weights(weights):
        for name, w in weights:
            w = transform(name, w)
            if ".experts.gate_up_proj" in name or ".experts.down_proj" in name:
                target = name.replace("experts.gate_up_proj", "experts.routed_experts.w13_weight").replace(
                    "experts.down_proj", "experts.routed_experts.w2_weight")
                p = params[target]
                for shard, half in ((0, 0), (1, 1)) if "gate_up" in name else ((0, None),):
                    part = w.chunk(2, dim=1)[half] if half is not None else w
                    for e, expert in enumerate(part.unbind()):
                        rows = p.data[e].shape[0] // (2 if half is not None else 1)
                        p.data[e].narrow(0, shard * rows, expert.shape[0]).copy_(expert)
                continue
            for param_name, weight_name, shard in STACKED:
                if f".{weight_name}." not in name:
                    continue
                p = params[name.replace(weight_name, param_name)]
                start = ({"q": 0, "k": qkv["q"], "v": qkv["q"] + qkv["k"]}[shard] if isinstance(shard, str)
                         else shard * w.shape[0])
                p.data.narrow(0, start, w.shape[0]).copy_(w)
                break
            else:
                p = params[name]
                if "embed_tokens" in name or "lm_head" in name:
                    p.data[: w.shape[0]].copy_(w)
                    p.data[w.shape[0]:].fill_(0)
                else:
                    assert p.shape == w.shape, name
                    p.data.copy_(w)
        return set(params)

    return load_weights


def _record(case_id: str, transform=lambda n, w: w) -> tuple[LoaderPlan, dict, object]:
    b = built(case_id)
    params = {n: torch.nn.Parameter(t.clone(), requires_grad=False) for n, t in b.vllm.items()}
    shapes, tied = hf_parameters(b.config, torch.float32)
    plan = record_loader_plan(vllm_like_loader(params, b.config, transform), params, shapes, tied,
                              b.config.model_type, "test loader")
    return plan, params, b


CROSS = ["llama-untied", "llama-tied", "qwen2-bias", "qwen3-qknorm", "gemma3-untied", "qwen3_moe-untied",
         "qwen3_moe-dense-layer", "qwen2_moe-shared"]


@pytest.mark.parametrize("case_id", CROSS)
def test_derived_plan_equals_the_table(case_id: str) -> None:
    plan, params, b = _record(case_id)
    assert differences(plan, table_plan({n: t.shape for n, t in b.vllm.items()}, b.config)) == []
    for name, p in params.items():  # the dry run wrote nothing, not even the vocab padding
        assert torch.equal(p, b.vllm[name]), name


def test_a_transposing_loader_gives_a_transposed_view() -> None:
    """GPT-2's loader copies Conv1D [in, out] weights transposed: a strided view, as the table says."""
    b = built("gpt2-untied")
    params = {n: torch.nn.Parameter(t.clone(), requires_grad=False) for n, t in b.vllm.items()}

    def load_weights(weights):
        for name, w in weights:
            p = params[name]
            if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                w = w.t()
            p.data[: w.shape[0]].copy_(w)
            if p.shape[0] > w.shape[0]:
                p.data[w.shape[0]:].fill_(0)

    shapes, tied = hf_parameters(b.config, torch.float32)
    plan = record_loader_plan(load_weights, params, shapes, tied, "gpt2")
    assert differences(plan, table_plan({n: t.shape for n, t in b.vllm.items()}, b.config)) == []
    assert plan.by_hf()["transformer.h.0.mlp.c_fc.weight"].stride == (1, 32)


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        (lambda n, w: w * 2 if "o_proj" in n else w, r"o_proj\.weight.*'mul'.*computes new values"),
        (lambda n, w: w.to(torch.float16) if "norm" in n else w, r"norm\.weight.*converts it to.*float16"),
        (lambda n, w: permute_rotary(w, 4) if "q_proj" in n else w, r"q_proj\.weight.*(no strided view|permutation)"),
        (lambda n, w: w[:1] if "down_proj" in n else w, r"down_proj\.weight"),
    ],
    ids=["arithmetic", "dtype", "permutation", "partial"],
)
def test_what_is_no_view_is_refused_naming_tensor_and_op(transform, message: str) -> None:
    with pytest.raises((MappingError, AssertionError), match=message):
        _record("llama-untied", transform)


def test_a_skipped_tensor_is_named() -> None:
    b = built("llama-untied")
    params = {n: torch.nn.Parameter(t.clone(), requires_grad=False) for n, t in b.vllm.items()}
    loader = vllm_like_loader(params, b.config)
    shapes, tied = hf_parameters(b.config, torch.float32)
    with pytest.raises(MappingError, match=r"model\.norm\.weight: vLLM's loader did not copy it"):
        record_loader_plan(lambda ws: loader((n, w) for n, w in ws if n != "model.norm.weight"), params, shapes, tied,
                           "llama")


def test_replacing_a_parameters_data_is_refused() -> None:
    p = torch.nn.Parameter(torch.zeros(4), requires_grad=False)

    def load_weights(weights):
        for _, w in weights:
            p.data = w

    with pytest.raises(MappingError, match=r"replaces a parameter's \.data"):
        record_loader_plan(load_weights, {"x": p}, {"x": (4,)}, {}, "toy")


def test_plan_round_trips_and_refuses_hostile_dicts() -> None:
    plan, _, _ = _record("llama-tied")
    assert LoaderPlan.from_dict(plan.to_dict()) == plan
    assert plan.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    d = plan.to_dict()
    bad = [
        ({**d, "format_version": 2}, "format_version"),
        ({**d, "extra": 1}, "unknown field"),
        ({**d, "tied": {"lm_head.weight": "nope"}}, "tied"),
        ({**d, "landings": [d["landings"][0], d["landings"][0]]}, "lands twice"),
        ({**d, "landings": [{**d["landings"][0], "stride": [0, 1]}]}, "overlap|stride"),
        ({**d, "landings": [{**d["landings"][0], "offset": -1}]}, "offset"),
    ]
    for value, message in bad:
        with pytest.raises(ManifestError, match=message):
            LoaderPlan.from_dict(value)
    with pytest.raises(ManifestError, match="overlap"):
        LoaderPlan("x", (Landing("a", "t", 0, (4,), (1,)), Landing("b", "t", 2, (4,), (1,))))


def test_a_plan_that_does_not_fit_the_tensors_is_refused() -> None:
    plan = LoaderPlan("x", (Landing("a", "t", 4, (4,), (1,)),))
    with pytest.raises(MappingError, match="elements 4:8 of t, which has 6"):
        plan.views({"t": torch.zeros(6)})
    with pytest.raises(MappingError, match="did not export"):
        plan.views({"u": torch.zeros(8)})


def _olmo2():
    import transformers as tf

    return tf.Olmo2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def test_a_table_less_architecture_attaches_through_its_derived_plan() -> None:
    """OLMo-2 has no table: vLLM-like fused tensors, the plan recorded from the loader, then attach through
    the manifest gives the reference logits, zero copy."""
    cfg = _olmo2()
    assert not mapping.has_table(cfg) and mapping.supported_model_types(paths=True)["olmo2"] == "derived"
    ref = reference_model(cfg)
    hf = dict(ref.state_dict())
    qkv = qkv_sizes(cfg)
    vllm: dict[str, torch.Tensor] = {}
    for name, t in hf.items():  # vLLM's layout: fused qkv and gate_up, vocab padded to 128
        for fused, parts in (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))):
            if f".{parts[0]}." in name:
                vllm[name.replace(parts[0], fused)] = torch.cat([hf[name.replace(parts[0], p)] for p in parts])
        if not any(f".{p}." in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            vllm[name] = torch.cat([t, t.new_zeros(28, *t.shape[1:])]) if t.shape[0] == 100 else t.clone()
    assert vllm["model.layers.0.self_attn.qkv_proj.weight"].shape[0] == sum(qkv.values())
    params = {n: torch.nn.Parameter(t, requires_grad=False) for n, t in vllm.items()}
    shapes, tied = hf_parameters(cfg, torch.float32)
    plan = record_loader_plan(vllm_like_loader(params, cfg), params, shapes, tied, "olmo2")
    tensors = {n: p.data for n, p in params.items()}  # kept alive: the export holds weak references
    manifest = ipcbridge.export(tensors, cfg, layout="vllm")
    manifest = ipcbridge.Manifest.from_json(manifest.replace(loader_plan=plan.to_dict()).to_json())
    model = ipcbridge.attach(manifest)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    with pytest.raises(MappingError, match="unknown architecture 'olmo2'"):
        ipcbridge.attach(manifest.replace(loader_plan=None))


def test_a_stale_table_is_caught_by_the_derived_plan() -> None:
    plan, params, b = _record("llama-untied")
    d = plan.to_dict()
    for la in d["landings"]:
        if la["hf"] == "model.layers.0.self_attn.k_proj.weight":
            la["offset"] += 32 * 32  # as if the engine stored [q | v | k]
        if la["hf"] == "model.layers.0.self_attn.v_proj.weight":
            la["offset"] -= 16 * 32
    tensors = {n: p.data for n, p in params.items()}
    manifest = ipcbridge.export(tensors, b.config, layout="vllm")
    with pytest.raises(MappingError, match="table disagrees with the plan derived"):
        ipcbridge.attach(manifest.replace(loader_plan=d))
