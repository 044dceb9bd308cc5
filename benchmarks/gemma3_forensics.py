"""Why gemma3_text's logprobs sit further from vLLM's than other architectures' (issue 11, item 3), on CPU.

On an H200 (vLLM 0.25.1, bf16, N(0, 0.05) weights written through the bridge) the mean |Δlogprob| between
the attached HF model and vLLM was 0.0006-0.0116 for ten architectures and 0.0207 (max 0.068) for
gemma3_text. This script takes the gap apart without a GPU:

* ``vllm_forward`` re-implements vLLM 0.25.1's Llama/Qwen3/Gemma3 forward in plain torch, op by op, with
  vLLM's precision choices (read from ``models/{llama,qwen3,gemma3}.py``, ``layers/layernorm.py``,
  ``ir/ops/layernorm.py``, ``kernels/vllm_c.py``, ``rotary_embedding/base.py`` and
  ``ops/triton_unified_attention.py``): fused q/k/v and gate/up GEMMs, RoPE from a bf16 cos/sin cache,
  attention with fp32 scores and softmax and bf16 probabilities into P@V, Gemma's norms as the *native*
  ``fused_add_rms_norm`` (their fp32 ``1 + w`` weight rules out the CUDA kernel: the sum feeds the norm
  unrounded), Llama's as the CUDA kernel (bf16 sum, then norm), bf16 logits.
* The weights are HF's own (the same tensors vLLM serves when attached), set like ``init_weights_``.
* Continuations (greedy and T=1 sampled, 16 tokens after the four prompts of ``bench_parity.py``) come
  from the vLLM-like forward, as vLLM's do; both sides then score them teacher-forced.

Columns (mean / max |Δlogprob| over all 128 scored tokens):

* ``vllm~ bf16 vs HF bf16``: the CPU stand-in for the GPU figure;
* ``vllm~ fp32 vs HF fp32``: both in fp32; a formula difference would survive here, rounding vanishes;
* ``HF bf16 vs HF fp32``: how far bf16 alone moves this model (its sensitivity to rounding);
* ``logit sd`` and ``ulp@tok``: the spread of the logits and the bf16 spacing at the scored token's logit,
  which bounds how finely a bf16 logit can agree between two implementations.

Variants (``arch:key=value[:key=value]``): ``gain=G`` sets every norm weight to G instead of 1 (Gemma
norms multiply by ``1 + w``, so ``init_weights_``'s 1.0 is a gain of 2 in each of Gemma3's 6 norms per
layer and the final one; Llama's gain is 1, ``llama:gain=2`` gives it Gemma's), ``hidden_size=64`` shrinks the width (logits
scale with sqrt(hidden)),
``fp32_logits=1`` computes both sides' lm_head in fp32, ``hf_norm_add=1`` makes the vLLM-like Gemma
norms round the residual sum to bf16 first (HF's order), ``window=4`` makes the sliding window bite.

    PYTHONPATH=. python benchmarks/gemma3_forensics.py [--archs llama,gemma3_text,...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11, 12], [300, 301, 302, 303, 304]]
DEFAULT = ("llama,qwen3,gemma,gemma2,gemma3_text,gemma3_text:gain=0,llama:gain=2,qwen3:gain=2,gemma3_text:hidden_size=64,"
           "gemma3_text:fp32_logits=1,gemma3_text:hf_norm_add=1,gemma3_text:window=4")
MAX_TOKENS = 16
GEMMA = ("gemma3_text",)
#: Architectures ``vllm_forward`` follows; the others (gemma, gemma2) get only the HF-side columns.
FOLLOWED = ("llama", "qwen3", *GEMMA)


@dataclass(frozen=True)
class Spec:
    arch: str
    gain: float = 1.0
    fp32_logits: bool = False
    hf_norm_add: bool = False
    overrides: tuple[tuple[str, int], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Spec:
        arch, *items = text.split(":")
        kw: dict[str, Any] = {"arch": arch}
        over = []
        for item in items:
            key, _, value = item.partition("=")
            if key == "gain":
                kw["gain"] = float(value)
            elif key in ("fp32_logits", "hf_norm_add"):
                kw[key] = bool(int(value))
            else:
                over.append(({"window": "sliding_window"}.get(key, key), int(value)))
        return cls(overrides=tuple(over), **kw)


def build(spec: Spec) -> tuple[Any, torch.nn.Module]:
    """(config, fp32 HF model) with ``init_weights_``'s weights: norms ``gain``, biases 0, the rest N(0, 0.05)."""
    from transformers import AutoModelForCausalLM

    from ipcbridge.vllm.testing import init_weights_
    from tests.vllm.test_vllm_derived import config_for

    cfg = config_for(spec.arch)
    for key, value in spec.overrides:
        setattr(cfg, key, value)
        if key == "hidden_size" and spec.arch in GEMMA:  # keep heads * head_dim == hidden, as config_for has it
            cfg.head_dim, cfg.intermediate_size = value // cfg.num_attention_heads, 2 * value
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        init_weights_(model, 0, 0.05)
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.fill_(spec.gain)
    return cfg, model


# ---- vLLM 0.25.1's forward, op by op ------------------------------------------------------------------


def _rms(x32: torch.Tensor, eps: float) -> torch.Tensor:
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def gemma_norm(x, w, eps, residual=None, hf_add=False):
    """vLLM GemmaRMSNorm -> ir.ops.(fused_add_)rms_norm, native impl (the fp32 ``w + 1`` fails vllm_c's
    dtype check): the sum is taken in fp32, stored as the bf16 residual, and normalised *unrounded*."""
    dt = x.dtype
    s = x.float() if residual is None else x.float() + residual.float()
    if hf_add and residual is not None:
        s = s.to(dt).float()  # HF: residual + hidden in bf16, then the norm
    out = (_rms(s, eps) * (w.float() + 1.0)).to(dt)
    return out if residual is None else (out, s.to(dt))


def llama_norm(x, w, eps, residual=None, hf_add=False):
    """vLLM RMSNorm -> vllm_c kernels: bf16 sum, fp32 statistics, ``bf16(x * rstd) * w`` in bf16."""
    dt = x.dtype
    s = x if residual is None else (x.float() + residual.float()).to(dt)
    out = _rms(s.float(), eps).to(dt) * w
    return out if residual is None else (out, s)


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox RoPE from vLLM's cos/sin cache (fp32, cast to the model dtype), applied in the model dtype."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    freqs = torch.einsum("i,j->ij", pos.float(), inv)
    cos, sin = freqs.cos().to(x.dtype)[:, None], freqs.sin().to(x.dtype)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def attention(q, k, v, scale: float, window: int | None) -> torch.Tensor:
    """Triton unified attention with one tile: S = scale * (Q K^T) in fp32, P = exp(S - max) in fp32,
    acc = bf16(P) @ V in fp32, out = acc / sum(P), in the model dtype. q [T, H, D], k/v [T, KV, D]."""
    t, h, _ = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    i = torch.arange(t)
    dist = i[:, None] - i[None, :]
    mask = (dist >= 0) & (dist < window if window else True)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    acc = torch.einsum("hqk,khd->qhd", p.to(q.dtype).float(), v.float())
    return (acc / p.sum(-1).transpose(0, 1)[..., None]).to(q.dtype)


def _attn(layer, cfg, x, pos, lt: str, gemma: bool) -> torch.Tensor:
    a, hd = layer.self_attn, cfg.head_dim
    qkv = F.linear(x, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                   None if a.q_proj.bias is None else torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
    nq, nkv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    q, k, v = (t.unflatten(-1, (-1, hd)) for t in qkv.split([nq, nkv, nkv], -1))
    if hasattr(a, "q_norm"):
        norm = gemma_norm if gemma else llama_norm
        q, k = norm(q, a.q_norm.weight, cfg.rms_norm_eps), norm(k, a.k_norm.weight, cfg.rms_norm_eps)
    rp = cfg.rope_parameters[lt] if gemma else cfg.rope_parameters
    q, k = rope(q, pos, rp["rope_theta"]), rope(k, pos, rp["rope_theta"])
    scale = cfg.query_pre_attn_scalar**-0.5 if gemma else hd**-0.5
    window = cfg.sliding_window if lt == "sliding_attention" else None
    return a.o_proj(attention(q, k, v, scale, window).flatten(-2))


def _mlp(mlp, x, act) -> torch.Tensor:
    gu = F.linear(x, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    g, u = gu.chunk(2, -1)
    return mlp.down_proj(act(g) * u)  # vLLM's CUDA *_and_mul: act rounded to bf16, then the product


@torch.no_grad()
def vllm_forward(model, cfg, ids: list[int], spec: Spec) -> torch.Tensor:
    """fp32 logits [T, vocab] as vLLM 0.25.1 computes them for Gemma3ForCausalLM / LlamaForCausalLM."""
    gemma = cfg.model_type in GEMMA
    m, eps = model.model, cfg.rms_norm_eps
    pos = torch.arange(len(ids))
    h = m.embed_tokens.weight[torch.tensor(ids)]
    if gemma:
        h = h * torch.tensor(cfg.hidden_size**0.5, dtype=h.dtype)  # the bf16 ``normalizer`` buffer
    act = (lambda x: F.gelu(x, approximate="tanh")) if gemma else F.silu

    def norm(x, layer_norm, residual=None):
        fn = gemma_norm if gemma else llama_norm
        return fn(x, layer_norm.weight, eps, residual, spec.hf_norm_add)

    residual = None
    for i, layer in enumerate(m.layers):
        lt = cfg.layer_types[i] if gemma else "full_attention"
        if residual is None:
            residual, h = h, norm(h, layer.input_layernorm)
        else:
            h, residual = norm(h, layer.input_layernorm, residual)
        h = _attn(layer, cfg, h, pos, lt, gemma)
        if gemma:
            h = norm(h, layer.post_attention_layernorm)
            h, residual = norm(h, layer.pre_feedforward_layernorm, residual)
            h = norm(_mlp(layer.mlp, h, act), layer.post_feedforward_layernorm)
        else:
            h, residual = norm(h, layer.post_attention_layernorm, residual)
            h = _mlp(layer.mlp, h, act)
    h, _ = norm(h, m.norm, residual)
    return _logits(model, h, spec)


def _logits(model, h: torch.Tensor, spec: Spec) -> torch.Tensor:
    w = model.lm_head.weight
    logits = F.linear(h.float(), w.float()) if spec.fp32_logits else F.linear(h, w)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return (torch.tanh(logits.float() / cap) * cap if cap else logits).float()


@torch.no_grad()
def hf_logits(model, ids: list[int], spec: Spec) -> torch.Tensor:
    if not spec.fp32_logits:
        return model(torch.tensor([ids])).logits[0].float()
    h = model.model(torch.tensor([ids])).last_hidden_state[0]
    return _logits(model, h, spec)


# ---- measuring ----------------------------------------------------------------------------------------


def continuations(model, cfg, spec: Spec) -> list[tuple[list[int], list[int]]]:
    """(prompt, 16 tokens) greedy and sampled at T=1 from the vLLM-like forward, as vLLM generates them
    (from HF's bf16 forward for an architecture ``vllm_forward`` does not follow)."""
    g = torch.Generator().manual_seed(1234)
    forward = vllm_forward if cfg.model_type in FOLLOWED else (lambda m, _c, ids, s: hf_logits(m, ids, s))
    out = []
    for greedy in (True, False):
        for prompt in PROMPTS:
            ids = list(prompt)
            for _ in range(MAX_TOKENS):
                logits = forward(model, cfg, ids, spec)[-1]
                nxt = logits.argmax() if greedy else torch.multinomial(logits.softmax(-1), 1, generator=g)[0]
                ids.append(int(nxt))
            out.append((prompt, ids[len(prompt):]))
    return out


def scored(logits: torch.Tensor, prompt: list[int], completion: list[int]) -> torch.Tensor:
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    return lp.gather(1, torch.tensor(completion)[:, None])[:, 0]


def _stats(d: torch.Tensor) -> tuple[float, float]:
    return float(d.mean()), float(d.max())


def measure(text: str) -> dict[str, Any]:
    spec = Spec.parse(text)
    cfg, m32 = build(spec)
    m16 = build(spec)[1].to(torch.bfloat16)
    seqs = continuations(m16, cfg, spec)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("v16", "h16", "v32", "h32")}
    tok_logit, spread = [], []
    for prompt, comp in seqs:
        ids = prompt + comp
        lg = {"h16": hf_logits(m16, ids, spec), "h32": hf_logits(m32, ids, spec)}
        if cfg.model_type in FOLLOWED:
            lg |= {"v16": vllm_forward(m16, cfg, ids, spec), "v32": vllm_forward(m32, cfg, ids, spec)}
        for k, v in lg.items():
            rows[k].append(scored(v, prompt, comp))
        sel = lg["h32"][len(prompt) - 1 : -1]
        tok_logit.append(sel.gather(1, torch.tensor(comp)[:, None])[:, 0].abs())
        spread.append(sel.std(-1))
    r = {k: torch.cat(v) for k, v in rows.items() if v}
    nan = (float("nan"), float("nan"))
    tl = torch.cat(tok_logit)
    ulp = torch.pow(2.0, torch.floor(torch.log2(tl.clamp_min(1e-3))) - 7)  # bf16 spacing at |logit|
    return {"spec": text, "tokens": int(r["h16"].numel()),
            "vllm_bf16_vs_hf_bf16": _stats((r["v16"] - r["h16"]).abs()) if "v16" in r else nan,
            "vllm_fp32_vs_hf_fp32": _stats((r["v32"] - r["h32"]).abs()) if "v32" in r else nan,
            "hf_bf16_vs_hf_fp32": _stats((r["h16"] - r["h32"]).abs()),
            "logit_sd": statistics.fmean(torch.cat(spread).tolist()), "ulp_at_token": float(ulp.mean())}


def _line(r: dict[str, Any]) -> str:
    def pair(k: str) -> str:
        return f"{r[k][0]:.4f} / {r[k][1]:.4f}"

    return (f"| {r['spec']} | {pair('vllm_bf16_vs_hf_bf16')} | {r['vllm_fp32_vs_hf_fp32'][0]:.1e} / "
            f"{r['vllm_fp32_vs_hf_fp32'][1]:.1e} | {pair('hf_bf16_vs_hf_fp32')} | {r['logit_sd']:.2f} | "
            f"{r['ulp_at_token']:.4f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=DEFAULT)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| spec | vllm~ bf16 vs HF bf16 (mean / max) | vllm~ fp32 vs HF fp32 | HF bf16 vs HF fp32 | "
          "logit sd | ulp@tok |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for text in filter(None, args.archs.split(",")):
        rows.append(measure(text))
        print(_line(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
