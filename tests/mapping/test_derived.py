"""Hostile loader plans (a worker's ``loader_plan`` in the manifest): views never share engine memory and
never tie what the HF model does not tie."""

from __future__ import annotations

import copy

import pytest
import torch

import ipcbridge
from ipcbridge.errors import MappingError
from ipcbridge.vllm.loader_plan import hf_parameters, record_loader_plan
from tests.mapping.mapping_cases import reference_model
from tests.vllm.test_loader_plan import _olmo2, vllm_like_loader

Q = "model.layers.0.self_attn.q_proj.weight"
O_PROJ = "model.layers.0.self_attn.o_proj.weight"
QKV = "model.layers.0.self_attn.qkv_proj.weight"


def _olmo2_engine():
    """OLMo-2 (no table: the plan is all there is) in vLLM's layout, and the plan its loader gives."""
    cfg = _olmo2()
    hf = dict(reference_model(cfg).state_dict())
    vllm: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        for fused, parts in (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj"))):
            if f".{parts[0]}." in name:
                vllm[name.replace(parts[0], fused)] = torch.cat([hf[name.replace(parts[0], p)] for p in parts])
        if not any(f".{p}." in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            vllm[name] = torch.cat([t, t.new_zeros(28, *t.shape[1:])]) if t.shape[0] == 100 else t.clone()
    params = {n: torch.nn.Parameter(t, requires_grad=False) for n, t in vllm.items()}
    shapes, tied = hf_parameters(cfg, torch.float32)
    plan = record_loader_plan(vllm_like_loader(params, cfg), params, shapes, tied, "olmo2")
    return cfg, {n: p.data for n, p in params.items()}, plan.to_dict()


def test_a_plan_cannot_tie_two_parameters_the_model_does_not_tie() -> None:
    cfg, tensors, plan = _olmo2_engine()
    hostile = copy.deepcopy(plan)
    hostile["landings"] = [la for la in hostile["landings"] if la["hf"] != O_PROJ]
    hostile["tied"] = {**hostile["tied"], O_PROJ: Q}  # o_proj would share q_proj's memory and updates
    manifest = ipcbridge.export(tensors, cfg, layout="vllm")
    with pytest.raises(MappingError, match="does not tie them"):
        ipcbridge.attach(manifest.replace(loader_plan=hostile))


def test_landings_in_aliasing_manifest_tensors_are_refused() -> None:
    """Two manifest tensors over the same bytes: each landing fits its own target, but q_proj and o_proj
    would be one memory."""
    cfg, tensors, plan = _olmo2_engine()
    aliased = {**tensors, O_PROJ: tensors[QKV][:32]}
    manifest = ipcbridge.export(aliased, cfg, layout="vllm")
    with pytest.raises(MappingError, match="overlapping engine memory"):
        ipcbridge.attach(manifest.replace(loader_plan=plan))


def test_the_honest_plan_still_attaches() -> None:
    cfg, tensors, plan = _olmo2_engine()
    model = ipcbridge.attach(ipcbridge.export(tensors, cfg, layout="vllm").replace(loader_plan=plan))
    assert model.model.layers[0].self_attn.q_proj.weight.data_ptr() == tensors[QKV].data_ptr()
