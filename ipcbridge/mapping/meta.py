"""The Meta / torchtitan layout: its tables and the rotary permutation.

Meta's reference Llama (``llama/model.py``), torchtitan and mistral-inference name a decoder
``tok_embeddings``, ``layers.N.attention.{wq,wk,wv,wo}``, ``layers.N.feed_forward.{w1,w2,w3}`` (gate, down,
up), ``layers.N.{attention_norm,ffn_norm}``, ``norm`` and ``output``; nothing is fused or padded. The one
real difference from HF/vLLM is where rotary embedding pairs sit inside a head of ``wq``/``wk``:

* **interleaved** (Meta): Meta applies RoPE with complex numbers, ``view_as_complex(x.reshape(..., d/2, 2))``,
  so pair ``i`` of a head is rows ``(2i, 2i+1)``.
* **half-split** (HF/vLLM): ``rotate_half`` pairs row ``i`` with row ``i + d/2``.

The same attention therefore needs each head's rows reordered, which HF's
``convert_llama_weights_to_hf.py`` does as ``w.view(n_heads, d / n_heads / 2, 2, in).transpose(1, 2)``.
Only the order of q and k rows within a head changes, and identically for both, so ``q . k`` (and the
attention scores) are unchanged; the tests prove it against both RoPE implementations.
"""

from __future__ import annotations

import torch

from ipcbridge.errors import MappingError
from ipcbridge.mapping.archs import TIED_LM_HEAD, ArchSpec
from ipcbridge.mapping.rules import Rotary, Rule, Same


def _head_view(w: torch.Tensor, n_heads: int, name: str) -> tuple[int, int]:
    rows = w.shape[0] if w.dim() else 0
    if n_heads <= 0 or rows % n_heads or (rows // n_heads) % 2:
        raise MappingError(
            f"{name}: {rows} rows cannot be split into {n_heads} heads of an even head_dim, which the rotary "
            "permutation needs; check num_attention_heads / num_key_value_heads / head_dim in the config"
        )
    return n_heads, rows // n_heads


def permute_rotary(w: torch.Tensor, n_heads: int, name: str = "tensor") -> torch.Tensor:
    """Meta's interleaved rotary rows -> HF/vLLM's half-split rows, per head (a new tensor).

    Row ``2i + j`` of a head (pair ``i``, real ``j=0`` / imaginary ``j=1``) moves to row ``j * d/2 + i``.
    Works for weights ``[n_heads * d, in]`` and biases ``[n_heads * d]``.
    """
    n, d = _head_view(w, n_heads, name)
    grouped = w.reshape(n, d // 2, 2, *w.shape[1:]).transpose(1, 2)
    return grouped.clone(memory_format=torch.contiguous_format).reshape(w.shape)


def unpermute_rotary(w: torch.Tensor, n_heads: int, name: str = "tensor") -> torch.Tensor:
    """HF/vLLM's half-split rotary rows -> Meta's interleaved rows, per head; the inverse of
    :func:`permute_rotary` (a new tensor)."""
    n, d = _head_view(w, n_heads, name)
    grouped = w.reshape(n, 2, d // 2, *w.shape[1:]).transpose(1, 2)
    return grouped.clone(memory_format=torch.contiguous_format).reshape(w.shape)


def llama_meta_table() -> dict[str, Rule]:
    """HF Llama names -> Meta names. ``w1``/``w3``/``w2`` are gate/up/down (``w2(silu(w1 x) * w3 x)``)."""
    attn, mlp, layer = "model.layers.{}.self_attn.", "model.layers.{}.mlp.", "layers.{}."
    return {
        "model.embed_tokens.weight": Same("tok_embeddings.weight"),
        f"{attn}q_proj.weight": Rotary(f"{layer}attention.wq.weight", heads="q"),
        f"{attn}k_proj.weight": Rotary(f"{layer}attention.wk.weight", heads="kv"),
        f"{attn}v_proj.weight": Same(f"{layer}attention.wv.weight"),
        f"{attn}o_proj.weight": Same(f"{layer}attention.wo.weight"),
        f"{mlp}gate_proj.weight": Same(f"{layer}feed_forward.w1.weight"),
        f"{mlp}down_proj.weight": Same(f"{layer}feed_forward.w2.weight"),
        f"{mlp}up_proj.weight": Same(f"{layer}feed_forward.w3.weight"),
        "model.layers.{}.input_layernorm.weight": Same(f"{layer}attention_norm.weight"),
        "model.layers.{}.post_attention_layernorm.weight": Same(f"{layer}ffn_norm.weight"),
        "model.norm.weight": Same("norm.weight"),
        "lm_head.weight": Same("output.weight"),
    }


# Llama and Mistral share Meta's layout (Meta's llama repo, torchtitan's Llama, mistral-inference). Biased or
# q/k-normed variants (Qwen) have no Meta layout here: their HF tensors are not in this table, so convert()
# names them. A tied config has no ``output.weight``: the HF lm_head is the embedding.
META_LLAMA = ArchSpec(
    name="llama (meta)",
    model_types=("llama", "mistral"),
    params=llama_meta_table(),
    tied=TIED_LM_HEAD,
)

META_ARCHITECTURES: list[ArchSpec] = [META_LLAMA]
