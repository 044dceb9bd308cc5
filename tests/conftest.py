from __future__ import annotations

import pytest
import torch


def tiny_config(model_type: str = "llama", tied: bool = False, **overrides):
    """A tiny decoder config; vocab 100 is not a multiple of 64, so vLLM's padding is exercised."""
    from transformers import AutoConfig

    kw = dict(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=tied,
    )
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def reference_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at ones: perturb every parameter so equality tests mean something
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def vllm_weights(model, config) -> dict[str, torch.Tensor]:
    from ipcbridge.mapping import to_vllm

    return {k: t.detach().clone() for k, t in to_vllm(dict(model.state_dict()), config).items()}


@pytest.fixture
def llama_config():
    return tiny_config("llama")
