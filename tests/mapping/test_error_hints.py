"""Mapping errors guess the likely mistake: a whole state dict in another layout than ``src`` says which
layout its names fit (``mapping.plan.layout_hint``), while a state dict that really lacks tensors does not."""

from __future__ import annotations

import pytest

from ipcbridge import mapping
from ipcbridge.errors import MappingError
from ipcbridge.mapping.plan import layout_fits, layout_hint
from tests.helpers import reference_model, tiny_config


@pytest.fixture(scope="module")
def layouts():
    config = tiny_config("llama")
    hf = dict(reference_model(config).state_dict())
    return config, {"hf": hf, "vllm": mapping.convert(hf, config, "hf", "vllm"),
                    "meta": mapping.convert(hf, config, "hf", "meta")}


@pytest.mark.parametrize(
    ("real", "src", "dst", "message"),
    [
        ("hf", "vllm", "hf", r"^these look like HF names \(e\.g\. 'model\.layers\.0\.self_attn\.q_proj\.weight'\); "
                             r"did you mean src='hf'\?"),
        ("hf", "meta", "hf", r"^these look like HF names .*did you mean src='hf'\?"),
        ("vllm", "hf", "vllm", r"^these look like vLLM names \(e\.g\. 'model\.layers\.0\.self_attn\.qkv_proj\.weight'\); "
                               r"did you mean src='vllm'\?"),
        ("vllm", "hf", "hf", r"^these look like vLLM names .*did you mean src='vllm'\?"),
        ("meta", "hf", "vllm", r"^these look like Meta names \(e\.g\. 'tok_embeddings\.weight'\); did you mean src='meta'\?"),
        ("meta", "vllm", "hf", r"^these look like Meta names .*did you mean src='meta'\?"),
    ],
)
def test_a_state_dict_under_the_wrong_src_is_named(layouts, real, src, dst, message) -> None:
    config, sds = layouts
    with pytest.raises(MappingError, match=message):
        mapping.convert(sds[real], config, src=src, dst=dst)


def test_to_vllm_of_vllm_weights_is_named(layouts) -> None:
    config, sds = layouts
    with pytest.raises(MappingError, match=r"^these look like vLLM names .*4 HF tensor\(s\) are not in the 'llama'"):
        mapping.to_vllm(sds["vllm"], config)


def test_a_state_dict_that_lacks_tensors_gets_no_guess(layouts) -> None:
    config, sds = layouts
    partial = {k: v for k, v in sds["hf"].items() if "layers.1." not in k}
    with pytest.raises(MappingError, match=r"^the HF state dict lacks") as info:
        mapping.convert(partial, config, src="hf", dst="vllm")
    assert "did you mean" not in str(info.value)


def test_layout_fits_scores_names_per_layout(layouts) -> None:
    _, sds = layouts
    fits = layout_fits(sds["vllm"], "llama")
    assert set(fits) == {"hf", "vllm", "meta"}
    assert fits["vllm"] == list(sds["vllm"])
    assert "model.layers.0.self_attn.qkv_proj.weight" not in fits["hf"]
    assert fits["meta"] == []
    assert layout_hint(sds["hf"], "llama", "hf") == ""
    assert layout_hint([], "llama", "vllm") == ""
    assert layout_hint(sds["hf"], "no-such-type", "vllm") == ""  # no tables: no guess
