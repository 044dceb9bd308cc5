"""MoE tables (qwen3_moe, qwen2_moe, mixtral): vLLM's fused expert tensors are whole-tensor aliases of
transformers' fused experts, the attached model steps them in place, and the layout facts the tables rest on
(Note [MoE experts are whole-tensor aliases]) hold in the installed transformers."""

from __future__ import annotations

import pytest
import torch

import ipcbridge
from ipcbridge import mapping
from ipcbridge.errors import MappingError
from tests.mapping.mapping_cases import MOE_CASE_IDS, built, token_ids

EXPERTS = {"qwen3_moe": "mlp", "qwen2_moe": "mlp", "mixtral": "block_sparse_moe"}


def _block(case_id: str) -> str:
    return EXPERTS[built(case_id).config.model_type]


@pytest.mark.parametrize("case_id", MOE_CASE_IDS)
def test_expert_tensors_are_vllm_tensors_whole(case_id: str) -> None:
    b = built(case_id)
    cfg, block = b.config, _block(case_id)
    experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    w13 = b.vllm[f"model.layers.0.{block}.experts.routed_experts.w13_weight"]
    w2 = b.vllm[f"model.layers.0.{block}.experts.routed_experts.w2_weight"]
    assert tuple(w13.shape) == (experts, 2 * inter, cfg.hidden_size)
    assert tuple(w2.shape) == (experts, cfg.hidden_size, inter)
    assert tuple(b.vllm[f"model.layers.0.{block}.gate.weight"].shape) == (experts, cfg.hidden_size)
    views = mapping.hf_views(b.vllm, cfg)
    assert views["model.layers.0.mlp.experts.gate_up_proj"] is w13  # not even a view: the tensor itself
    assert views["model.layers.0.mlp.experts.down_proj"] is w2
    kinds = {s.hf: s.kind() for s in mapping.plan_from_hf(b.hf, cfg)}
    assert kinds["model.layers.0.mlp.experts.gate_up_proj"] == "alias"


def test_gate_rows_come_first_as_in_vllms_w13() -> None:
    """vLLM's w13 is [w1=gate | w3=up]; transformers must chunk gate_up_proj the same way, or the
    attached logits (test_convert) would be wrong only by the activation's asymmetry."""
    b = built("qwen3_moe-untied")
    experts = b.ref.model.layers[0].mlp.experts
    x = torch.randn(3, b.config.hidden_size)
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[1]).chunk(2, dim=-1)
    inter = b.config.moe_intermediate_size
    assert torch.equal(gate, x @ experts.gate_up_proj[1, :inter].T)
    assert torch.equal(up, x @ experts.gate_up_proj[1, inter:].T)


def test_qwen2_moe_shared_expert_rows() -> None:
    b = built("qwen2_moe-shared")
    fused = b.vllm["model.layers.1.mlp.shared_expert.gate_up_proj.weight"]
    assert fused.shape[0] == 2 * 24
    views = mapping.hf_views(b.vllm, b.config)
    assert views["model.layers.1.mlp.shared_expert.up_proj.weight"].data_ptr() == fused[24:].data_ptr()
    assert tuple(b.vllm["model.layers.1.mlp.shared_expert_gate.weight"].shape) == (1, 32)


def test_dense_layers_of_a_moe_model_fuse_like_llama() -> None:
    b = built("qwen3_moe-dense-layer")
    assert "model.layers.1.mlp.gate_up_proj.weight" in b.vllm  # mlp_only_layers=[1]
    assert "model.layers.0.mlp.experts.routed_experts.w13_weight" in b.vllm
    assert "model.layers.1.mlp.experts.routed_experts.w13_weight" not in b.vllm


@pytest.mark.parametrize("case_id", MOE_CASE_IDS)
def test_a_step_writes_the_fused_experts_in_place(case_id: str) -> None:
    b = built(case_id)
    v = {k: t.clone() for k, t in b.vllm.items()}
    before = {k: (t.data_ptr(), t.clone()) for k, t in v.items()}
    model = ipcbridge.attach(v, b.config)
    ref = built(case_id).ref
    ref_state = {k: t.clone() for k, t in ref.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ids = token_ids()
    for m, o in ((model.train(), opt), (ref.train(), ref_opt)):
        o.zero_grad()
        m(ids, labels=ids).loss.backward()
        o.step()
    try:
        block = _block(case_id)
        for name in (f"model.layers.0.{block}.experts.routed_experts.w13_weight",
                     f"model.layers.0.{block}.experts.routed_experts.w2_weight", f"model.layers.0.{block}.gate.weight"):
            ptr, old = before[name]
            assert v[name].data_ptr() == ptr, name  # same memory ...
            assert not torch.equal(v[name], old), name  # ... written by the step
        after = mapping.hf_views(v, b.config)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(after[name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)
    finally:
        ref.load_state_dict(ref_state)
        ref.zero_grad(set_to_none=True)
        ref.eval()


def test_a_wrong_expert_count_is_named() -> None:
    b = built("mixtral-untied")
    v = dict(b.vllm)
    v["model.layers.0.block_sparse_moe.experts.routed_experts.w13_weight"] = torch.zeros(3, 32, 32)
    with pytest.raises(MappingError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj.*shape \[3, 32, 32\]"):
        mapping.convert(v, b.config, "vllm", "hf")


def test_mixtral_experts_live_under_block_sparse_moe() -> None:
    b = built("mixtral-untied")
    assert not any(".mlp." in k for k in b.vllm)
    with pytest.raises(MappingError, match="have no HF counterpart"):
        mapping.hf_views({k.replace(".block_sparse_moe.", ".mlp."): t for k, t in b.vllm.items()}, b.config)
