"""The rotary permutation, proven on attention scores: Meta's complex-number RoPE on Meta-layout weights
and HF's ``rotate_half`` RoPE on the permuted (HF-layout) weights give the same scores, for random
weights, scattered positions and grouped-query attention. Inverse-ness alone would not catch a
permutation that is consistently wrong in both directions."""

from __future__ import annotations

import math

import pytest
import torch

from ipcbridge import mapping
from ipcbridge.errors import MappingError
from ipcbridge.mapping import permute_rotary, unpermute_rotary
from tests.mapping.mapping_cases import COMMON, reference_model

POSITIONS = torch.tensor([0, 1, 2, 7, 31, 100, 1023])


def meta_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's reference: pairs (2i, 2i+1) of the head dim are one complex number, rotated by e^{i p f_i}."""
    d = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    angles = torch.outer(positions.float(), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles).to(torch.complex128)  # [T, d/2]
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())  # [T, H, d/2]
    return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(-2)


def hf_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, theta: float, heads: int, kv: int):
    """transformers' own Llama RoPE: LlamaRotaryEmbedding's cos/sin and apply_rotary_pos_emb (rotate_half)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    d = q.shape[-1]
    cfg = LlamaConfig(hidden_size=heads * d, num_attention_heads=heads, num_key_value_heads=kv,
                      rope_theta=theta, max_position_embeddings=2048)
    if getattr(cfg, "rope_parameters", None):  # transformers 5 reads theta from rope_parameters
        cfg.rope_parameters["rope_theta"] = theta
    rotary = LlamaRotaryEmbedding(cfg)
    cos, sin = rotary(q, positions[None])  # [1, T, d]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos.double(), sin.double())
    return q_hf[0].transpose(0, 1), k_hf[0].transpose(0, 1)  # back to [T, H, d]


def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[H, T, T] pre-softmax attention scores; query head h reads kv head h // (H / KV)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    return torch.einsum("thd,shd->hts", q, k) / math.sqrt(q.shape[-1])


@pytest.mark.parametrize(("heads", "kv", "d", "theta"), [(4, 4, 8, 10000.0), (8, 2, 16, 500000.0), (6, 3, 4, 10000.0)])
def test_permuted_weights_give_metas_attention_scores(heads: int, kv: int, d: int, theta: float) -> None:
    g = torch.Generator().manual_seed(heads * 100 + d)
    hidden = 24
    wq_meta = torch.randn(heads * d, hidden, generator=g, dtype=torch.float64)
    wk_meta = torch.randn(kv * d, hidden, generator=g, dtype=torch.float64)
    x = torch.randn(len(POSITIONS), hidden, generator=g, dtype=torch.float64)

    q_meta = meta_rope((x @ wq_meta.T).view(-1, heads, d), POSITIONS, theta)
    k_meta = meta_rope((x @ wk_meta.T).view(-1, kv, d), POSITIONS, theta)

    wq_hf, wk_hf = permute_rotary(wq_meta, heads), permute_rotary(wk_meta, kv)
    q_hf, k_hf = hf_rope((x @ wq_hf.T).view(-1, heads, d), (x @ wk_hf.T).view(-1, kv, d), POSITIONS, theta,
                         heads, kv)

    expected = scores(q_meta, k_meta)
    # Both RoPEs compute their angles' cos/sin in fp32 (as the originals do), by different kernels: agreement
    # is to fp32 rounding, far below the O(1) differences of a wrong permutation checked next.
    torch.testing.assert_close(scores(q_hf, k_hf), expected, rtol=1e-5, atol=1e-5)
    # The check has teeth: HF's RoPE on the unpermuted weights is a different attention.
    q_bad, k_bad = hf_rope((x @ wq_meta.T).view(-1, heads, d), (x @ wk_meta.T).view(-1, kv, d), POSITIONS, theta,
                           heads, kv)
    assert not torch.allclose(scores(q_bad, k_bad), expected, atol=1e-3)
    assert torch.equal(unpermute_rotary(wq_hf, heads), wq_meta)
    assert torch.equal(unpermute_rotary(wk_hf, kv), wk_meta)


def test_convert_hf_to_meta_keeps_the_models_attention_scores() -> None:
    """End to end through convert(): a real HF Llama (GQA) and its Meta export attend identically."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("llama", num_key_value_heads=2, **COMMON)
    hf = dict(reference_model(cfg).state_dict())
    hf = {k: t.double() for k, t in hf.items()}
    meta = mapping.convert(hf, cfg, "hf", "meta")
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or cfg.rope_theta
    x = torch.randn(len(POSITIONS), cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for layer in range(cfg.num_hidden_layers):
        wq, wk = meta[f"layers.{layer}.attention.wq.weight"], meta[f"layers.{layer}.attention.wk.weight"]
        expected = scores(meta_rope((x @ wq.T).view(-1, heads, d), POSITIONS, theta),
                          meta_rope((x @ wk.T).view(-1, kv, d), POSITIONS, theta))
        q = (x @ hf[f"model.layers.{layer}.self_attn.q_proj.weight"].T).view(-1, heads, d)
        k = (x @ hf[f"model.layers.{layer}.self_attn.k_proj.weight"].T).view(-1, kv, d)
        torch.testing.assert_close(scores(*hf_rope(q, k, POSITIONS, theta, heads, kv)), expected, rtol=1e-5, atol=1e-5)


def test_permutation_always_copies_and_checks_head_sizes() -> None:
    w = torch.randn(8, 3)
    for f in (permute_rotary, unpermute_rotary):
        out = f(w, 4)  # head_dim 2: the permutation is the identity, and still a new tensor
        assert torch.equal(out, w) and out.data_ptr() != w.data_ptr()
    b = torch.arange(16.0)  # a bias permutes like a weight's rows
    assert permute_rotary(b, 2).tolist() == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    with pytest.raises(MappingError, match=r"wq: 6 rows cannot be split into 4 heads"):
        permute_rotary(torch.zeros(6, 3), 4, "wq")
    with pytest.raises(MappingError, match="even head_dim"):
        unpermute_rotary(torch.zeros(12, 3), 4, "wk")
