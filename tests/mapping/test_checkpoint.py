"""HF parameters as checkpoint tensors: transformers' conversion mapping reversed into views, checked against
transformers' own ``save_pretrained`` (which reverts the same mapping) for every MoE architecture."""

from __future__ import annotations

import os

import pytest
import torch

from ipcbridge.errors import MappingError
from ipcbridge.mapping.checkpoint import Fusion, Renaming, Unsupported, checkpoint_rules, checkpoint_views
from tests.mapping.mapping_cases import MOE_CASE_IDS, built, reference_model


@pytest.mark.parametrize("case_id", MOE_CASE_IDS)
def test_views_are_what_save_pretrained_writes(case_id: str, tmp_path) -> None:
    from safetensors.torch import load_file

    b = built(case_id)
    ref = reference_model(b.config)
    ref.save_pretrained(tmp_path)
    saved: dict[str, torch.Tensor] = {}
    for f in os.listdir(tmp_path):
        if f.endswith(".safetensors"):
            saved.update(load_file(os.path.join(tmp_path, f)))
    rules = checkpoint_rules(b.config.model_type)
    assert any(isinstance(r, Fusion) for r in rules)
    ours: dict[str, torch.Tensor] = {}
    for name, t in ref.state_dict().items():
        for ckpt, view in checkpoint_views(name, t, rules):
            assert view.untyped_storage().data_ptr() == t.untyped_storage().data_ptr(), ckpt  # a view, no copy
            assert ckpt not in ours, f"{ckpt} made twice"
            ours[ckpt] = view
    if b.config.tie_word_embeddings:  # a tied lm_head is not saved
        del ours["lm_head.weight"]
    assert sorted(ours) == sorted(saved)
    for k, v in saved.items():
        assert torch.equal(ours[k], v), k


def test_dense_models_and_old_transformers_keep_their_names() -> None:
    assert checkpoint_rules("llama") == () and checkpoint_rules("olmo2") == ()
    t = torch.zeros(2, 3)
    assert checkpoint_views("model.norm.weight", t, ()) == [("model.norm.weight", t)]


def test_mixtral_rules_are_read_as_data() -> None:
    rules = checkpoint_rules("mixtral")
    assert Renaming(".block_sparse_moe.", ".mlp.") in rules
    assert Fusion((".experts.*.w1.weight", ".experts.*.w3.weight"), ".experts.gate_up_proj", 0, 1) in rules
    names = [n for n, _ in checkpoint_views("model.layers.1.mlp.experts.down_proj", torch.zeros(3, 4, 2), rules)]
    assert names == [f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight" for e in range(3)]


def test_what_cannot_be_reversed_is_refused_for_the_tensors_it_touches() -> None:
    class Transpose:
        dim0, dim1 = 1, 2

    class MergeModulelist:
        dim = 0

    class WeightConverter:
        source_patterns = ["mlp.experts.*.w.weight"]
        target_patterns = ["mlp.experts.w"]
        operations = [MergeModulelist(), Transpose()]

    from ipcbridge.mapping.checkpoint import _rule

    rule = _rule(WeightConverter())
    assert isinstance(rule, Unsupported) and "Transpose" in rule.what
    assert checkpoint_views("model.norm.weight", torch.zeros(2), (rule,))[0][0] == "model.norm.weight"
    with pytest.raises(MappingError, match=r"model\.layers\.0\.mlp\.experts\.w: transformers builds it .*Transpose"):
        checkpoint_views("model.layers.0.mlp.experts.w", torch.zeros(2, 3, 4), (rule,))


def test_an_odd_concatenation_is_refused() -> None:
    rule = Fusion(("e.*.a", "e.*.b"), ".experts.gate_up_proj", 0, 1)
    with pytest.raises(MappingError, match="does not split into 2 equal"):
        checkpoint_views("m.experts.gate_up_proj", torch.zeros(2, 3, 4), (rule,))
