"""Alias plans derived from a loader: the recorder driven by loaders written like vLLM's
(``stacked_params_mapping`` loops, vocab padding, fused experts unbound per expert), cross-checked against
every table it can reproduce, refusing what is no view, and attaching a table-less architecture."""

from __future__ import annotations

import re

import pytest
import torch

import ipcbridge
from ipcbridge import mapping
from ipcbridge.attach import attach_with_attachment
from ipcbridge.errors import ManifestError, MappingError
from ipcbridge.mapping.derived import Landing, LoaderPlan, differences, table_plan
from ipcbridge.mapping.rotary import permute_rotary
from ipcbridge.mapping.spec import qkv_sizes
from ipcbridge.vllm.loader_plan import hf_parameters, record_loader_plan
from tests.mapping.mapping_cases import built, reference_model, token_ids

STACKED = [("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
           ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1)]


EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
FUSED = re.compile(r"^(.*)\.experts\.(gate_up_proj|down_proj)$")
SHARD = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": None, "w2": None}


def _load_expert(params, prefix: str, shard: int | None, e: int, w) -> None:
    """RoutedExperts' weight_loader (vLLM 0.25.1 routed_experts.py): w1/w3 narrow w13[e]'s rows, w2 is w2[e]."""
    name = "w13_weight" if shard is not None else "w2_weight"
    p = params[f"{prefix}.experts.routed_experts.{name}"].data[e]
    rows = p.shape[0] // 2 if shard is not None else p.shape[0]
    p.narrow(0, (shard or 0) * rows, rows).copy_(w)


def vllm_like_loader(params: dict[str, torch.nn.Parameter], config, transform=lambda n, w: w):
    """``load_weights`` as vLLM writes it: stacked params narrowed by shard; experts by checkpoint name
    (``experts.{e}.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.{e}.w1.weight``) or fused
    (``experts.gate_up_proj``, chunked and unbound as RoutedExperts.load_weights does); vocab rows copied
    and the padding zeroed; the rest copied."""
    qkv = qkv_sizes(config)
    block = "block_sparse_moe" if config.model_type == "mixtral" else "mlp"

    def load_weights(weights):
        for name, w in weights:
            w = transform(name, w)
            name = name.replace(".mlp.", f".{block}.") if block != "mlp" else name
            if m := EXPERT.match(name):
                _load_expert(params, m[1], SHARD[m[3]], int(m[2]), w)
                continue
            if m := FUSED.match(name):
                parts = w.chunk(2, dim=1) if m[2] == "gate_up_proj" else (w,)
                for shard, part in enumerate(parts):
                    for e, expert in enumerate(part.unbind()):
                        _load_expert(params, m[1], shard if m[2] == "gate_up_proj" else None, e, expert)
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


def meta_vllm_params(hf_shapes: dict[str, tuple[int, ...]], config) -> dict[str, torch.nn.Parameter]:
    """A Llama-family model's vLLM parameters on the meta device (no memory): fused qkv and gate_up, vocab
    padded to 64 rows."""
    qkv, inter = qkv_sizes(config), config.intermediate_size
    params = {}
    for name, shape in hf_shapes.items():
        if any(f".{k}." in name for k in ("k_proj", "v_proj", "up_proj")):
            continue
        name = name.replace("q_proj", "qkv_proj").replace("gate_proj", "gate_up_proj")
        rows = sum(qkv.values()) if "qkv_proj" in name else 2 * inter if "gate_up_proj" in name else shape[0]
        if shape[0] == config.vocab_size:
            rows = -(-rows // 64) * 64
        params[name] = torch.nn.Parameter(torch.empty((rows, *shape[1:]), dtype=torch.bfloat16, device="meta"),
                                          requires_grad=False)
    return params


def _record(case_id: str, transform=lambda n, w: w, rules=None) -> tuple[LoaderPlan, dict, object]:
    b = built(case_id)
    params = {n: torch.nn.Parameter(t.clone(), requires_grad=False) for n, t in b.vllm.items()}
    shapes, tied = hf_parameters(b.config, torch.float32)
    plan = record_loader_plan(vllm_like_loader(params, b.config, transform), params, shapes, tied,
                              b.config.model_type, "test loader", rules=rules)
    return plan, params, b


CROSS = ["llama-untied", "llama-tied", "qwen2-bias", "qwen3-qknorm", "gemma3-untied", "qwen3_moe-untied",
         "qwen3_moe-dense-layer", "qwen2_moe-shared", "mixtral-untied"]


@pytest.mark.parametrize("names", ["checkpoint", "fused"])
@pytest.mark.parametrize("case_id", CROSS)
def test_derived_plan_equals_the_table(case_id: str, names: str) -> None:
    """Fed checkpoint names (per expert, Mixtral's block_sparse_moe) or the HF parameters' own (fused) names,
    the loader's per-expert copies compose into the fused parameter's one landing, as the table says."""
    if names == "fused" and case_id.startswith("mixtral"):
        pytest.skip("vLLM's Mixtral loader knows no fused names (its experts are w1/w2/w3)")
    plan, params, b = _record(case_id, rules=() if names == "fused" else None)
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
    model, att = attach_with_attachment(manifest)
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    # What Bridge.check counts, read from the addresses (it once asked the absent table and refused)
    assert att.tensors_used(model) == set(vllm) and att.outside(model) == []
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


def test_an_8b_llama_derives_over_meta_parameters_without_per_weight_memory() -> None:
    """Llama-3-8B widths (2 layers): the parameters are meta tensors and the recording tensors stay symbolic
    (Note [recording tensors are symbolic until a loader copies them]), so nothing per weight is allocated,
    and the plan still equals the table (vocab 128256, GQA 32/8)."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    shapes, tied = hf_parameters(cfg, torch.bfloat16)
    params = meta_vllm_params(shapes, cfg)
    plan = record_loader_plan(vllm_like_loader(params, cfg), params, shapes, tied, "llama")
    assert differences(plan, table_plan({n: p.shape for n, p in params.items()}, cfg)) == []


def test_a_loader_feeds_moe_experts_by_checkpoint_name() -> None:
    b = built("mixtral-untied")
    params = {n: torch.nn.Parameter(t.clone(), requires_grad=False) for n, t in b.vllm.items()}
    loader, fed = vllm_like_loader(params, b.config), []

    def spy(weights):
        return loader((fed.append((n, tuple(w.shape))) or (n, w)) for n, w in weights)

    shapes, tied = hf_parameters(b.config, torch.float32)
    plan = record_loader_plan(spy, params, shapes, tied, "mixtral")
    names = dict(fed)
    e, i, h = b.config.num_local_experts, b.config.intermediate_size, b.config.hidden_size
    assert names["model.layers.0.block_sparse_moe.experts.3.w1.weight"] == (i, h)
    assert names["model.layers.1.block_sparse_moe.experts.0.w2.weight"] == (h, i)
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert not any(".mlp." in n or "gate_up_proj" in n for n in names)
    w13 = plan.by_hf()["model.layers.0.mlp.experts.gate_up_proj"]  # 2E expert copies, one whole-tensor landing
    assert (w13.target, w13.offset, w13.shape) == ("model.layers.0.block_sparse_moe.experts.routed_experts.w13_weight",
                                                  0, (e, 2 * i, h))


@pytest.mark.parametrize("how", ["contiguous", "cat", "clone"])
def test_copying_moves_are_followed_element_by_element(how: str) -> None:
    """A loader that copies values around (a transpose made contiguous, a cat of its own halves) still lands
    each element where the values say: the explicit path gives the same plan as the table."""
    b = built("gpt2-untied")
    params = {n: torch.nn.Parameter(t.clone(), requires_grad=False) for n, t in b.vllm.items()}
    move = {"contiguous": lambda w: w.t().contiguous(), "cat": lambda w: torch.cat([w.t()[:3], w.t()[3:]]),
            "clone": lambda w: w.t().clone()}[how]

    def load_weights(weights):
        for name, w in weights:
            p = params[name]
            if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                w = move(w)
            p.data[: w.shape[0]].copy_(w)

    shapes, tied = hf_parameters(b.config, torch.float32)
    plan = record_loader_plan(load_weights, params, shapes, tied, "gpt2")
    assert differences(plan, table_plan({n: t.shape for n, t in b.vllm.items()}, b.config)) == []


@pytest.mark.parametrize(
    ("load", "message"),
    [
        (lambda p, w: (p.data[:2].copy_(w[:2]), p.data[2:4].copy_(w[:2])), "never lands|lands more than once"),
        (lambda p, w: (p.data.copy_(w), p.data.copy_(w)), "lands more than once"),
        (lambda p, w: p.data.copy_(w.flip(0)), "permutation|no trainable view"),
        (lambda p, w: p.data.copy_(w[:, :1].expand(4, 3)), "never lands|lands more than once"),
    ],
    ids=["half-twice", "whole-twice", "flipped", "expanded"],
)
def test_pieces_that_make_no_view_are_refused(load, message: str) -> None:
    p = torch.nn.Parameter(torch.zeros(4, 3), requires_grad=False)

    def load_weights(weights):
        for _, w in weights:
            load(p, w)

    with pytest.raises(MappingError, match=message):
        record_loader_plan(load_weights, {"x": p}, {"x": (4, 3)}, {}, "toy", rules=())
    assert torch.equal(p, torch.zeros(4, 3))
