"""ipcbridge.hf, the boundary to transformers and accelerate: every config form each normaliser takes, the
field readers, JSON-safe config dicts, and meta-device models whose buffers are real."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ipcbridge import hf
from ipcbridge.errors import BridgeError, MappingError
from tests.helpers import tiny_config
from tests.mapping.mapping_cases import CASE_IDS, CASES


def _raises(error: type[Exception], message: str):
    return pytest.raises(error, match=re.escape(message))


# ---- readers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_dict", [False, True], ids=["object", "dict"])
def test_readers_take_config_objects_and_dicts(as_dict: bool) -> None:
    cfg = tiny_config("llama")
    config = cfg.to_dict() if as_dict else cfg
    assert hf.model_type(config) == "llama"
    assert hf.config_value(config, "vocab_size") == 100
    assert hf.config_value(config, "no_such_field", 7) == 7
    assert (hf.positive(config, "hidden_size"), hf.head_dim(config), hf.kv_heads(config)) == (64, 16, 2)
    with _raises(MappingError, "config has no field 'no_such_field', which this architecture needs"):
        hf.config_value(config, "no_such_field")


def test_readers_derive_defaults_and_name_the_field() -> None:
    mha = {"model_type": "llama", "num_attention_heads": 4, "hidden_size": 64}
    assert (hf.head_dim(mha), hf.kv_heads(mha)) == (16, 4)  # head_dim from hidden; MHA without kv heads
    with _raises(MappingError, "config has no 'model_type'; pass a transformers config, or its to_dict()"):
        hf.model_type({"vocab_size": 100})
    with _raises(MappingError, "config.num_attention_heads must be a positive integer, got True"):
        hf.positive({"num_attention_heads": True}, "num_attention_heads")
    with _raises(MappingError, "hidden_size 66 is not divisible by num_attention_heads 4; set head_dim"):
        hf.head_dim({**mha, "hidden_size": 66})
    with _raises(MappingError, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"):
        hf.kv_heads({**mha, "num_key_value_heads": 3})


# ---- to_hf_config --------------------------------------------------------------------------------------


def test_to_hf_config_from_every_form(tmp_path) -> None:
    from transformers import LlamaConfig

    cfg = tiny_config("llama")
    assert hf.to_hf_config(cfg) is cfg
    from_dict = hf.to_hf_config(cfg.to_dict())
    assert isinstance(from_dict, LlamaConfig) and from_dict.to_dict() == cfg.to_dict()
    cfg.save_pretrained(tmp_path)
    for path in (str(tmp_path), tmp_path):
        from_dir = hf.to_hf_config(path)
        assert isinstance(from_dir, LlamaConfig) and from_dir.num_key_value_heads == 2


def test_to_hf_config_refusals_name_the_fix() -> None:
    with _raises(MappingError, "config has no 'model_type'; pass a transformers config, or its to_dict() (which "
                 "carries model_type, e.g. 'llama')"):
        hf.to_hf_config({"vocab_size": 100})
    with _raises(MappingError, "transformers rejects this 'no-such-model' config"):
        hf.to_hf_config({"model_type": "no-such-model"})
    with _raises(TypeError, "config must be a transformers config, a dict with 'model_type' or a local model "
                 "directory, got int"):
        hf.to_hf_config(3)


# ---- config_dict ---------------------------------------------------------------------------------------


def test_config_dict_from_every_form(tmp_path) -> None:
    cfg = tiny_config("llama")
    d = hf.config_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    assert d["model_type"] == "llama" and d["vocab_size"] == 100 and d["num_key_value_heads"] == 2
    assert hf.config_dict(None) is None
    assert hf.config_dict(d) == d and hf.config_dict(d) is not d  # a copy: the manifest owns its dict
    cfg.save_pretrained(tmp_path)
    assert hf.config_dict(str(tmp_path))["num_key_value_heads"] == 2
    assert hf.to_hf_config(d).to_dict() == cfg.to_dict()  # what a manifest carries rebuilds the config
    with _raises(TypeError, "config must be a transformers config, a dict or a local model directory, got int"):
        hf.config_dict(3)


def test_config_dict_with_an_attribute_json_cannot_hold() -> None:
    cfg = tiny_config("llama")
    cfg.engine_extra = torch.float16  # engines (vLLM) add such attributes to the config they serve
    d = hf.config_dict(cfg)
    assert d["engine_extra"] == "torch.float16" and d["vocab_size"] == 100
    assert json.loads(json.dumps(d)) == d
    assert hf.config_dict({"model_type": "llama", "dtype": torch.bfloat16}) == {
        "model_type": "llama", "dtype": "torch.bfloat16"}
    with _raises(TypeError, "the config cannot be written as JSON"):
        hf.config_dict({("a", "b"): 1})


# ---- model directories ---------------------------------------------------------------------------------


def test_write_model_dir(tmp_path) -> None:
    def read(path: str) -> dict:
        return json.loads((tmp_path / path / "config.json").read_text())

    cfg = tiny_config("llama")
    (tmp_path / "a").mkdir()
    assert hf.write_model_dir(cfg, str(tmp_path / "a")) == str(tmp_path / "a")
    assert read("a")["architectures"] == ["LlamaForCausalLM"] and read("a")["vocab_size"] == 100
    assert not cfg.architectures  # the caller's config is left as it was
    (tmp_path / "q").mkdir()
    hf.write_model_dir({"model_type": "qwen3", "vocab_size": 7}, str(tmp_path / "q"))
    assert read("q")["architectures"] == ["Qwen3ForCausalLM"]
    with _raises(BridgeError, "cannot write a model directory: config has no 'model_type'"):
        hf.write_model_dir({"vocab_size": 7}, str(tmp_path / "q"))
    with _raises(TypeError, "config must be a transformers config or a dict, got int"):
        hf.write_model_dir(3, str(tmp_path / "q"))
    assert hf.architecture_for("gpt2") == "GPT2LMHeadModel"
    with _raises(BridgeError, "transformers has no causal LM for model_type 'no-such-model'"):
        hf.architecture_for("no-such-model")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_load_hf_state_dict_from_a_seed_and_from_a_directory(tmp_path, tied: bool) -> None:
    cfg = tiny_config("llama", tied=tied)
    config, state = hf.load_hf_state_dict({"config": hf.config_dict(cfg), "seed": 3})
    again = hf.load_hf_state_dict({"config": cfg.to_dict(), "seed": 3})[1]
    assert config.to_dict() == cfg.to_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    assert ("lm_head.weight" in state) != tied
    from safetensors.torch import save_file

    # A tied checkpoint may still hold lm_head (older transformers wrote it); the loader drops it.
    head = {"lm_head.weight": state["model.embed_tokens.weight"].clone()} if tied else {}
    save_file({**state, **head}, tmp_path / "model.safetensors")
    cfg.save_pretrained(tmp_path)
    config, loaded = hf.load_hf_state_dict({"path": str(tmp_path)})
    assert config.tie_word_embeddings == tied
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    cfg.save_pretrained(tmp_path / "config_only")
    with _raises(FileNotFoundError, "no *.safetensors files in"):
        hf.load_hf_state_dict({"path": str(tmp_path / "config_only")})


# ---- models on the meta device -------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma"])
def test_build_meta_model_has_meta_parameters_and_real_buffers(model_type: str) -> None:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type, tied=model_type == "gemma")
    model = hf.build_meta_model(cfg.to_dict(), torch.bfloat16)  # a dict config works too
    params = dict(model.named_parameters(remove_duplicate=False))
    assert params and all(p.is_meta for p in params.values()), [n for n, p in params.items() if not p.is_meta]
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    real = dict(AutoModelForCausalLM.from_config(cfg).named_buffers())
    buffers = dict(model.named_buffers())
    assert any(n.endswith("inv_freq") for n in buffers)
    assert buffers.keys() == real.keys()
    for name, buf in buffers.items():  # computed at construction, exactly as a real model computes them
        assert not buf.is_meta, name
        torch.testing.assert_close(buf, real[name], rtol=0, atol=0, check_dtype=False)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_build_skips_weight_init_yet_buffers_equal_a_fully_initialised_model(case_id: str) -> None:
    """Note [no weight init on the meta device]: HF's init would recompute rotary and embedding-scale
    buffers; skipping it is right only while every architecture computes them at construction."""
    from transformers import AutoModelForCausalLM

    cfg = next(c for c in CASES if c.id == case_id).config()
    model = hf.build_meta_model(cfg, torch.bfloat16)
    assert all(p.is_meta for p in model.parameters())
    full = AutoModelForCausalLM.from_config(cfg)
    # tied as the full model is: the same distinct parameters (callers count them)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in full.named_parameters()]
    real = dict(full.named_buffers())
    buffers = dict(model.named_buffers())
    assert buffers.keys() == real.keys()
    for name, buf in buffers.items():
        assert not buf.is_meta, name
        torch.testing.assert_close(buf, real[name], rtol=0, atol=0, check_dtype=False)
    import torch.nn.init as torch_init

    assert torch_init.normal_.__module__ == "torch.nn.init"  # the no-op init is gone after the build


def test_weight_init_is_skipped_while_building() -> None:
    calls: list[str] = []
    original = torch.nn.init.normal_
    torch.nn.init.normal_ = lambda t, *a, **k: calls.append("normal_") or original(t, *a, **k)
    try:
        hf.build_meta_model(tiny_config("llama"), torch.float32)
    finally:
        torch.nn.init.normal_ = original
    assert calls == []


def test_materialize_buffers_moves_buffers_and_never_parameters() -> None:
    model = hf.build_meta_model(tiny_config("llama"), torch.float32)
    with torch.device("cpu"):
        model.lm_head.weight = torch.nn.Parameter(torch.zeros(100, 64))  # stands for an engine's view
    before = {n: p for n, p in model.named_parameters()}
    hf.materialize_buffers(model, "meta")  # the one other device a CPU machine has
    assert all(b.is_meta for b in model.buffers())
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in before.items()) and not after["lm_head.weight"].is_meta
