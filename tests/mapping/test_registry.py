"""The registry: which table maps a config for a layout, refusals that name the fix, and adding tables."""

from __future__ import annotations

import dataclasses
import re

import pytest

from ipcbridge import mapping
from ipcbridge.errors import MappingError
from ipcbridge.mapping import registry
from tests.mapping.mapping_cases import CASES, COMMON, in_every_layout


def _raises(message: str):
    return pytest.raises(MappingError, match=re.escape(message))


def test_every_model_type_has_a_case() -> None:
    covered = {c.config().model_type for c in CASES}
    assert set(mapping.supported_model_types()) - covered <= {"mistral"}  # mistral: Llama's table, same code


def test_unknown_architecture_and_layout() -> None:
    cfg, _, sd = in_every_layout("llama")
    with _raises("unknown architecture 'bert' for the 'vllm' layout: ipcbridge maps gemma, gemma2"):
        mapping.convert(sd["hf"], {"model_type": "bert"}, "hf", "vllm")
    with _raises("unknown architecture 'gemma3' (that is the multimodal"):
        mapping.plan_from_hf([], {"model_type": "gemma3"})
    with _raises("unknown architecture 'qwen2' for the 'meta' layout: ipcbridge maps llama, mistral"):
        mapping.convert({}, {"model_type": "qwen2"}, "hf", "meta")
    with _raises("unknown layout 'torchtitan'"):
        mapping.convert(sd["hf"], cfg, "hf", "torchtitan")
    with _raises("no tables for layout 'hf': the layouts with tables are 'vllm' and 'meta'"):
        mapping.supported_model_types("hf")
    with _raises("config has no 'model_type'; pass a transformers config, or its to_dict()"):
        mapping.get_arch({"vocab_size": 100})


@pytest.mark.parametrize(
    ("model_type", "overrides", "message"),
    [
        ("gemma", {"tie_word_embeddings": False}, "config.tie_word_embeddings=False is not supported for 'gemma'"),
        ("gemma", {"attention_bias": True}, "config.attention_bias=True is not supported for 'gemma'"),
        ("gemma2", {"tie_word_embeddings": False}, "config.tie_word_embeddings=False is not supported for 'gemma2'"),
        ("gpt2", {"add_cross_attention": True}, "config.add_cross_attention=True is not supported for 'gpt2'"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "config.scale_attn_by_inverse_layer_idx=True"),
    ],
)
def test_variants_vllm_cannot_serve_are_refused(model_type: str, overrides: dict, message: str) -> None:
    with _raises(message):
        mapping.plan_from_vllm([], {"model_type": model_type, **COMMON, **overrides})


def test_get_arch_by_layout() -> None:
    cfg = in_every_layout("mistral")[0]
    assert mapping.get_arch(cfg).name == "llama"
    assert mapping.get_arch(cfg, "meta").name == "llama (meta)"
    assert registry.bound_arch(cfg, "meta").layout == "meta"


@pytest.mark.parametrize("layout", ["vllm", "meta"])
def test_register_replaces_the_table_for_its_model_types(layout: str) -> None:
    tables = mapping.ARCHITECTURES if layout == "vllm" else mapping.META_ARCHITECTURES
    before = list(tables)
    cfg = in_every_layout("llama")[0]
    old = mapping.get_arch(cfg, layout)
    mine = dataclasses.replace(old, name="my llama", model_types=("llama",))
    try:
        mapping.register(mine, layout=layout)
        assert mapping.get_arch(cfg, layout) is mine
        assert sum(a is mine for a in tables) == 1 and old not in tables
        # The replaced table served mistral too; only the registered table's model types stay mapped.
        assert "mistral" not in mapping.supported_model_types(layout)
    finally:
        tables[:] = before
    assert mapping.get_arch(cfg, layout) is old
    with _raises("no tables for layout 'hf'"):
        mapping.register(mine, layout="hf")
