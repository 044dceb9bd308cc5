"""The Meta / torchtitan table: HF parameter name template -> rule naming the Meta tensor.

Meta's reference Llama (``llama/model.py``), torchtitan and mistral-inference name a decoder
``tok_embeddings``, ``layers.N.attention.{wq,wk,wv,wo}``, ``layers.N.feed_forward.{w1,w2,w3}`` (gate, down,
up), ``layers.N.{attention_norm,ffn_norm}``, ``norm`` and ``output``; nothing is fused or padded. The one
real difference from HF/vLLM is where rotary embedding pairs sit inside a head of ``wq``/``wk``, which the
``Rotary`` rules map (see :mod:`ipcbridge.mapping.rotary`).
"""

from __future__ import annotations

from ipcbridge.mapping.spec import TIED_LM_HEAD, ArchSpec, Rotary, Rule, Same


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

#: The Meta tables, in the order the registry starts with.
TABLES: tuple[ArchSpec, ...] = (META_LLAMA,)
