"""Per-architecture tables: HF parameter name template -> rule naming the vLLM tensor (vLLM 0.25.1).

Sources of each fact are noted per table. "Observed" means read off real vLLM 0.25.1 on the GPU machine
(``../shared/vllm-device/arch_check.py`` and the vllm-marked tests); "source" means vLLM's model file under
``vllm/model_executor/models/`` (vocab padding: ``layers/vocab_parallel_embedding.py``,
``DEFAULT_VOCAB_PADDING_SIZE = 64``, applied to ``VocabParallelEmbedding`` and ``ParallelLMHead`` but not to
the plain ``nn.Embedding`` position tables of GPT-2 and OPT). HF names are those of the installed
``transformers`` (``AutoModelForCausalLM.from_config``).
"""

from __future__ import annotations

from ipcbridge.mapping.spec import (
    GATE_UP,
    QKV,
    SHARED_GATE_UP,
    TIED_LM_HEAD,
    ArchSpec,
    Rows,
    Rule,
    Same,
    Transposed,
    Vocab,
    moe_sizes,
    no_rows,
    qkv_sizes,
)


def llama_like(**extra: Rule) -> dict[str, Rule]:
    """The Llama decoder table, shared by most dense decoders; ``extra`` adds per-arch tensors."""
    attn, mlp = "model.layers.{}.self_attn.", "model.layers.{}.mlp."
    table: dict[str, Rule] = {"model.embed_tokens.weight": Vocab()}
    for p in QKV:
        for suffix in ("weight", "bias"):
            table[f"{attn}{p}_proj.{suffix}"] = Rows(f"{attn}qkv_proj.{suffix}", part=p, parts=QKV)
    table[f"{attn}o_proj.weight"] = Same()
    table[f"{attn}o_proj.bias"] = Same()
    for p in GATE_UP:
        for suffix in ("weight", "bias"):
            table[f"{mlp}{p}_proj.{suffix}"] = Rows(f"{mlp}gate_up_proj.{suffix}", part=p, parts=GATE_UP)
    table[f"{mlp}down_proj.weight"] = Same()
    table[f"{mlp}down_proj.bias"] = Same()
    table["model.layers.{}.input_layernorm.weight"] = Same()
    table["model.layers.{}.post_attention_layernorm.weight"] = Same()
    table["model.norm.weight"] = Same()
    table["lm_head.weight"] = Vocab()
    table.update(extra)
    return table


QK_NORM = {
    "model.layers.{}.self_attn.q_norm.weight": Same(),
    "model.layers.{}.self_attn.k_norm.weight": Same(),
}
SANDWICH_NORMS = {  # Gemma2/3: norms before and after the MLP too
    "model.layers.{}.pre_feedforward_layernorm.weight": Same(),
    "model.layers.{}.post_feedforward_layernorm.weight": Same(),
}

# Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (q_norm/k_norm). Observed on vLLM 0.25.1 (Llama: names,
# shapes, [q|k|v] and [gate|up] row order, vocab 1000 -> 1024, untied lm_head padded like the embedding);
# source: vllm/model_executor/models/{llama,mistral,qwen2,qwen3}.py (Qwen2/3 subclass Llama's layout).
LLAMA = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    params=llama_like(**QK_NORM),
    tied=TIED_LM_HEAD,
)

# Gemma. Observed on vLLM 0.25.1: Llama's names and shapes, no lm_head.weight. Source gemma.py:
# GemmaForCausalLM asserts tie_word_embeddings and computes logits from model.embed_tokens; q/k/v and o_proj
# are built with bias=False whatever config.attention_bias says. GemmaRMSNorm computes x * (1 + w), as HF
# does, so the zero-centred weights are the same numbers on both sides: Same, never shifted. The sqrt(hidden)
# embedding scale is a non-persistent buffer on both sides, not a parameter.
GEMMA = ArchSpec(
    name="gemma",
    model_types=("gemma",),
    params=llama_like(),
    tied=TIED_LM_HEAD,
    tie_default=True,
    requires={
        "tie_word_embeddings": (True, "vLLM 0.25.1's GemmaForCausalLM asserts tied embeddings (gemma.py)"),
        "attention_bias": (False, "vLLM 0.25.1 builds Gemma's qkv_proj/o_proj without biases (gemma.py)"),
    },
)

# Gemma2. Source only (gemma2.py): Gemma's layout plus pre_/post_feedforward_layernorm; qkv_proj/o_proj
# biases follow config.attention_bias; asserts tie_word_embeddings. Soft-capping is config, not weights.
GEMMA2 = ArchSpec(
    name="gemma2",
    model_types=("gemma2",),
    params=llama_like(**SANDWICH_NORMS),
    tied=TIED_LM_HEAD,
    tie_default=True,
    requires={
        "tie_word_embeddings": (True, "vLLM 0.25.1's Gemma2ForCausalLM asserts tied embeddings (gemma2.py)"),
    },
)

# Gemma3 text (transformers model_type "gemma3_text", Gemma3ForCausalLM). Source only (gemma3.py): Gemma2's
# layout plus per-head q_norm/k_norm [head_dim]. Unlike Gemma/Gemma2, Gemma3ForCausalLM builds a padded
# ParallelLMHead and only ties it when config.tie_word_embeddings (the default) says so: both are mapped.
GEMMA3 = ArchSpec(
    name="gemma3",
    model_types=("gemma3_text",),
    params=llama_like(**SANDWICH_NORMS, **QK_NORM),
    tied=TIED_LM_HEAD,
    tie_default=True,
)

# Phi-3. Source only (phi3.py): Phi3ForCausalLM is LlamaForCausalLM with packed_modules_mapping
# qkv_proj -> [qkv_proj], gate_up_proj -> [gate_up_proj], so checkpoint tensors load unsplit. HF's Phi3
# stores them fused in vLLM's order too (transformers modeling_phi3: q = rows [:heads*hd], then k, then v;
# gate, up = gate_up.chunk(2)): the HF tensor is the vLLM tensor.
PHI3 = ArchSpec(
    name="phi3",
    model_types=("phi3",),
    params={
        "model.embed_tokens.weight": Vocab(),
        "model.layers.{}.self_attn.qkv_proj.weight": Same(),
        "model.layers.{}.self_attn.o_proj.weight": Same(),
        "model.layers.{}.mlp.gate_up_proj.weight": Same(),
        "model.layers.{}.mlp.down_proj.weight": Same(),
        "model.layers.{}.input_layernorm.weight": Same(),
        "model.layers.{}.post_attention_layernorm.weight": Same(),
        "model.norm.weight": Same(),
        "lm_head.weight": Vocab(),
    },
    tied=TIED_LM_HEAD,
)


def _gpt2_table() -> dict[str, Rule]:
    h = "transformer.h.{}."
    table: dict[str, Rule] = {"transformer.wte.weight": Vocab(), "transformer.wpe.weight": Same()}
    for linear in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        table[f"{h}{linear}.weight"] = Transposed()
        table[f"{h}{linear}.bias"] = Same()
    for norm in (f"{h}ln_1", f"{h}ln_2", "transformer.ln_f"):
        table[f"{norm}.weight"] = Same()
        table[f"{norm}.bias"] = Same()
    table["lm_head.weight"] = Vocab()
    return table


# GPT-2. Observed on vLLM 0.25.1: transformer.wte [1024, 256] for vocab 1000 (padded), wpe [512, 256] plain,
# h.N.attn.c_attn [768, 256], attn.c_proj [256, 256], mlp.c_fc [1024, 256], mlp.c_proj [256, 1024] (vLLM's
# [out, in]), biases and ln_1/ln_2/ln_f as HF; no lm_head. Source gpt2.py: load_weights transposes HF's
# Conv1D [in, out] weights; c_attn is one QKVParallelLinear, [q | k | v] like HF's split(n_embd, dim=2), so
# it needs no row mapping; lm_head is a padded ParallelLMHead tied to wte when tie_word_embeddings. The
# GPT2Model asserts below are variants vLLM cannot serve.
GPT2 = ArchSpec(
    name="gpt2",
    model_types=("gpt2",),
    params=_gpt2_table(),
    sizes=no_rows,
    tied={"lm_head.weight": "transformer.wte.weight"},
    tie_default=True,
    requires={
        "add_cross_attention": (False, "vLLM 0.25.1's GPT2Model asserts no cross-attention (gpt2.py)"),
        "scale_attn_by_inverse_layer_idx": (False, "vLLM 0.25.1's GPT2Model asserts it off (gpt2.py)"),
        "reorder_and_upcast_attn": (False, "vLLM 0.25.1's GPT2Model asserts it off (gpt2.py)"),
    },
)


def _opt_table() -> dict[str, Rule]:
    d, layer = "model.decoder.", "model.decoder.layers.{}."
    table: dict[str, Rule] = {
        f"{d}embed_tokens.weight": Vocab(),
        f"{d}embed_positions.weight": Same(),
        f"{d}project_in.weight": Same(),
        f"{d}project_out.weight": Same(),
        f"{d}final_layer_norm.weight": Same(),
        f"{d}final_layer_norm.bias": Same(),
    }
    for suffix in ("weight", "bias"):
        for p in QKV:
            table[f"{layer}self_attn.{p}_proj.{suffix}"] = Rows(
                f"{layer}self_attn.qkv_proj.{suffix}", part=p, parts=QKV
            )
        for m in ("self_attn.out_proj", "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm"):
            table[f"{layer}{m}.{suffix}"] = Same()
    table["lm_head.weight"] = Vocab()
    return table


# OPT. Observed on vLLM 0.25.1: model.decoder.embed_tokens [1024, 256] (vocab 1000 padded),
# embed_positions [514, 256] (max_position_embeddings + OPT's offset of 2, unpadded, like HF's),
# layers.N.self_attn.qkv_proj weight [768, 256] / bias [768], out_proj, fc1 [512, 256], fc2 [256, 512],
# self_attn_layer_norm, final_layer_norm; no lm_head (OPT ties by default). Source opt.py: q/k/v (and their
# biases, present iff config.enable_bias) are stacked into qkv_proj in q, k, v order; project_in/project_out
# exist iff word_embed_proj_dim != hidden_size, the decoder's final_layer_norm iff do_layer_norm_before and
# not _remove_final_layer_norm, exactly as in HF, so those variants map by name alone; an untied lm_head is
# a padded ParallelLMHead [vocab, word_embed_proj_dim].
OPT = ArchSpec(
    name="opt",
    model_types=("opt",),
    params=_opt_table(),
    sizes=qkv_sizes,
    tied={"lm_head.weight": "model.decoder.embed_tokens.weight"},
    tie_default=True,
)


# ---- mixture of experts ---------------------------------------------------------------------------------
# Note [MoE experts are whole-tensor aliases]
#     transformers 5.x keeps each layer's routed experts fused: ``mlp.experts.gate_up_proj [E, 2I, H]`` with
#     rows ``[gate | up]`` (``linear(x, gate_up_proj[e]).chunk(2, dim=-1)`` in modeling_{qwen2_moe,qwen3_moe,
#     mixtral}.py, 5.17 and 5.24 alike) and ``mlp.experts.down_proj [E, H, I]``, no ``.weight`` suffix.
#     vLLM 0.25.1's unquantized FusedMoE keeps ``experts.routed_experts.w13_weight [E, 2I, H]`` (``[w1=gate |
#     w3=up]``: routed_experts.py ``_load_w13`` narrows rows 0:I for w1, I:2I for w3) and ``w2_weight
#     [E, H, I]``: the same shapes and order, so each expert tensor is the vLLM tensor (``Same``), no row
#     mapping. The router ``mlp.gate.weight [E, H]`` is a ReplicatedLinear. This holds only while vLLM keeps
#     those tensors as loaded: ``process_weights_after_loading`` (unquantized_fused_moe_method.py) hands them
#     to the MoE backend's ``convert_to_unquantized_kernel_format``, which for TRITON (what vLLM picks on
#     Hopper, and the only backend in the slim bundle) is ``.contiguous()`` of contiguous tensors, i.e. the
#     same memory; FLASHINFER_CUTLASS swaps the halves to ``[w3 | w1]`` and FLASHINFER_TRTLLM / AITER shuffle
#     into block layouts (copies in another order), and ROCm's VLLM_ROCM_MOE_PADDING pads rows. The worker
#     refuses those backends (:mod:`ipcbridge.vllm.policy`): start vLLM with ``moe_backend="triton"``.

MOE_EXPERTS = {
    "model.layers.{}.mlp.gate.weight": Same(),
    "model.layers.{}.mlp.experts.gate_up_proj": Same("model.layers.{}.mlp.experts.routed_experts.w13_weight"),
    "model.layers.{}.mlp.experts.down_proj": Same("model.layers.{}.mlp.experts.routed_experts.w2_weight"),
}
SHARED_EXPERT = {  # Qwen2-MoE: one dense expert beside the routed ones, scaled by sigmoid(shared_expert_gate x)
    **{
        f"model.layers.{{}}.mlp.shared_expert.{p}_proj.weight": Rows(
            "model.layers.{}.mlp.shared_expert.gate_up_proj.weight", part=f"shared_{p}", parts=SHARED_GATE_UP
        )
        for p in GATE_UP
    },
    "model.layers.{}.mlp.shared_expert.down_proj.weight": Same(),
    "model.layers.{}.mlp.shared_expert_gate.weight": Same(),
}

# Qwen3-MoE: Qwen3's attention (q_norm/k_norm, no biases) and MOE_EXPERTS; layers in config.mlp_only_layers
# keep a dense MLP, which llama_like maps (vLLM's mapper fuses .mlp.gate_proj/.up_proj into gate_up_proj).
# Source qwen3_moe.py; names observed on vLLM 0.25.1 and 0.26.0 (../shared/vllm-device/README.md).
QWEN3_MOE = ArchSpec(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    params=llama_like(**QK_NORM, **MOE_EXPERTS),
    sizes=moe_sizes,
    tied=TIED_LM_HEAD,
)

# Qwen2-MoE: Qwen2's attention (q/k/v biases), MOE_EXPERTS and SHARED_EXPERT (source qwen2_moe.py:
# shared_expert is a Qwen2MoeMLP with a merged gate_up_proj of 2 * shared_expert_intermediate_size rows,
# shared_expert_gate a ReplicatedLinear [1, H]).
QWEN2_MOE = ArchSpec(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    params=llama_like(**MOE_EXPERTS, **SHARED_EXPERT),
    sizes=moe_sizes,
    tied=TIED_LM_HEAD,
)

# Mixtral: Mistral's attention and the experts of MOE_EXPERTS, which vLLM keeps under block_sparse_moe.
# (mixtral.py: MixtralDecoderLayer.block_sparse_moe = MixtralMoE(gate=ReplicatedLinear, experts=FusedMoE));
# transformers 5.x calls the block mlp, like Qwen.
MIXTRAL = ArchSpec(
    name="mixtral",
    model_types=("mixtral",),
    params=llama_like(**{
        hf: Same((rule.target or hf).replace(".mlp.", ".block_sparse_moe."))
        for hf, rule in MOE_EXPERTS.items()
    }),
    sizes=moe_sizes,
    tied=TIED_LM_HEAD,
)

#: The MoE tables (Note [MoE experts are whole-tensor aliases]).
MOE_TABLES: tuple[ArchSpec, ...] = (QWEN3_MOE, QWEN2_MOE, MIXTRAL)

#: The vLLM tables, in the order the registry starts with.
TABLES: tuple[ArchSpec, ...] = (LLAMA, GEMMA, GEMMA2, GEMMA3, PHI3, GPT2, OPT, *MOE_TABLES)
