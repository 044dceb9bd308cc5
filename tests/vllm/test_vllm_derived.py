"""Real vLLM 0.25.1: alias plans derived from the served model's own ``load_weights``.

1. For every table architecture (dense and MoE) the worker's derived plan equals the table's plan, and every
   table-less one derives a plan: one test, ``benchmarks/derive_check.py`` (vLLM's model built without an
   engine, one process per architecture, in parallel: about a minute for all, not 17 engines).
2. Three architectures without a table (olmo2, granite, cohere) attach through the derived plan with
   coverage, zero copy and logprob parity, on real engines.

Run: ``pytest -m vllm tests/vllm/test_vllm_derived.py`` (MoE cases need the WITH_MOE bundle).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import ipcbridge
from tests.vllm import vllm_helpers as H
from tests.vllm.test_vllm_moe import MOE_ARCHS, moe_config

pytestmark = pytest.mark.vllm

PROMPTS = H.PROMPTS

TABLE_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "opt",
               *MOE_ARCHS)
DERIVED_ARCHS = ("olmo2", "granite", "stablelm", "cohere")
#: The table-less architectures proven on real engines (the others derive their plans in derive_check).
ATTACH_ARCHS = ("olmo2", "granite", "cohere")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config_for(arch: str):
    import transformers as tf

    if arch in MOE_ARCHS:
        return moe_config(arch)
    if arch in ("llama", "qwen2", "qwen3"):
        return H.tiny_config(arch)
    kw = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=256, n_layer=2, n_head=4, n_positions=512, vocab_size=1000)
    if arch == "opt":
        return tf.OPTConfig(ffn_dim=512, word_embed_proj_dim=256, pad_token_id=0,
                            **{k: v for k, v in kw.items() if k != "intermediate_size"})
    if arch in ("gemma", "gemma2", "gemma3_text"):
        extra = {} if arch == "gemma" else {"sliding_window": 128}
        return tf.AutoConfig.for_model(arch, num_key_value_heads=2, head_dim=64, **extra, **kw)
    if arch == "phi3":  # its default pad_token_id (32000) lies outside this vocab, which vLLM refuses
        return tf.AutoConfig.for_model(arch, num_key_value_heads=2, pad_token_id=0, **kw)
    return tf.AutoConfig.for_model(arch, num_key_value_heads=2, **kw)


def _engine(arch: str):
    H.require_vllm()
    from ipcbridge.vllm.colocate import VllmEngine
    from ipcbridge.vllm.extension import EXTENSION_QUALNAME

    return VllmEngine(config_for(arch), gpu_memory_utilization=0.2, init="dummy",
                      worker_extension_cls=EXTENSION_QUALNAME)


def test_derived_plans_equal_the_tables(tmp_path) -> None:
    """Every architecture at once, one process each, in parallel (benchmarks/derive_check.py)."""
    H.require_vllm()
    out = tmp_path / "derive.json"
    archs = ",".join(TABLE_ARCHS + DERIVED_ARCHS)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "derive_check.py"), "--json", str(out),
                           "--archs", archs], cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    rows = json.loads(out.read_text())
    for r in rows:
        H.record("derived_vs_table", **{k: r.get(k) for k in ("arch", "path", "tensors", "equal", "differences",
                                                               "weights_untouched", "seconds", "error")})
    assert sorted(r["arch"] for r in rows) == sorted(archs.split(","))
    assert [r["arch"] for r in rows if not r.get("ok")] == [], proc.stdout[-3000:]


@pytest.mark.parametrize("arch", ATTACH_ARCHS)
def test_table_less_architecture_attaches_with_parity(arch: str) -> None:
    with _engine(arch) as engine:
        torch.empty(1, device="cuda")
        bridge = ipcbridge.connect(engine)
        try:
            report = bridge.check(prompt=PROMPTS[0], max_tokens=16)
            assert report.ok and report.parameters_outside_engine == [] and report.trainer_weight_bytes == 0
            with bridge.update():
                H.init_weights(bridge.model, seed=0, std=0.05)
            pg = H.parity(bridge.model, engine.generate(PROMPTS, max_tokens=16, temperature=0.0))
            H.record("derived_attach", arch=arch, engine_tensors=report.engine_tensors, parity=pg)
            assert pg["mean_abs_diff"] < 0.05
        finally:
            bridge.close()
