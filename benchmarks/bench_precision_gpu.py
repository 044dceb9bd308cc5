"""Cost of fp32-exact training on a 1B-shaped bf16 Llama: optimizer step time and trainer memory per mode.

One process, one GPU, random weights (Llama-3.2-1B's shape: hidden 2048, 16 layers, vocab 128256, tied).
For each variant it measures, with CUDA events, the optimizer step (median of ``--iters`` after warm-up)
and, with the caching allocator's counters, the trainer's weight-related memory per parameter:

* ``plain bf16``: AdamW straight on the bf16 weights (learns worse: ``bench_precision.py``);
* ``remainder`` / ``fp32`` / ``stochastic``: ``ipcbridge.optim.master_weights(AdamW, mode)``;
* ``copy-based``: what copy-based sync frameworks do: the trainer owns a bf16 model *and* an fp32 master
  (classic mixed precision), and after each step copies its bf16 weights into the engine's (here a
  device-to-device copy into a second bf16 buffer: the lower bound of any sync).

``persistent B/param`` counts what the trainer keeps between steps beyond the engine's bf16 weights,
the gradients and AdamW's two fp32 moments (identical in every variant): 0 for plain, 2 for remainder,
4 for fp32, 6 for copy-based (its own bf16 copy and the master). ``peak B/param`` is the transient
above that during the step. ``% of train step`` divides the step time by a training step (forward +
backward of ``--batch`` x ``--seq`` tokens, plus plain AdamW).

Run on the GPU machine (about 2 minutes on an H200)::

    PYTHONPATH=. python3 benchmarks/bench_precision_gpu.py [--batch 8 --seq 2048] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
from collections.abc import Callable
from typing import Any

import torch

from ipcbridge.optim import master_weights

VARIANTS = ("plain bf16", "remainder", "fp32", "stochastic", "copy-based")


def llama_1b(tiny: bool) -> Any:
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                       max_position_embeddings=4096, rope_theta=500000.0)


def cuda_time(fn: Callable[[], None], iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


class CopyBased:
    """Classic mixed precision in a trainer that owns its weights, then the copy into the engine's."""

    def __init__(self, params: list[torch.Tensor], impl: dict[str, bool]) -> None:
        self.params = params
        self.engine = [p.detach().clone() for p in params]  # stands in for the engine's own copy
        self.masters = [p.detach().float().clone() for p in params]
        self.opt = torch.optim.AdamW(self.masters, lr=1e-5, **impl)

    @torch.no_grad()
    def step(self) -> None:
        for m, p in zip(self.masters, self.params, strict=True):
            m.grad = p.grad.float()
        self.opt.step()
        for m in self.masters:
            m.grad = None
        torch._foreach_copy_(self.params, self.masters)
        torch._foreach_copy_(self.engine, self.params)  # the sync, device to device


def measure(name: str, impl: dict[str, bool], model: torch.nn.Module, iters: int,
            chunk_bytes: int | None = None) -> dict[str, Any]:
    params = [p for p in model.parameters()]
    n = sum(p.numel() for p in params)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    if name == "copy-based":
        opt: Any = CopyBased(params, impl)
        extra_keep = 2 * n  # its bf16 copy stands for the trainer's own weights; the engine's is not counted
    elif name == "plain bf16":
        opt, extra_keep = torch.optim.AdamW(params, lr=1e-5, **impl), 0
    else:
        kw = {"chunk_bytes": chunk_bytes} if chunk_bytes else {}
        opt = master_weights(torch.optim.AdamW(params, lr=1e-5, **impl), name, seed=0, **kw)
        extra_keep = 0
    step = opt.step
    step()  # creates AdamW's moments
    torch.cuda.synchronize()
    moments = 8 * n if name != "plain bf16" else 4 * n  # bf16 moments for plain AdamW on bf16 weights
    persistent = torch.cuda.memory_allocated() - base - moments - (2 * n if name == "copy-based" else 0)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    seconds = cuda_time(step, iters)
    peak = torch.cuda.max_memory_allocated() - before
    del opt, step
    for p in params:
        p.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    return {"variant": name, "adamw": next(iter(impl)), "step_ms": seconds * 1e3, "persistent_bytes_per_param": (persistent + extra_keep) / n,
            "peak_bytes_per_param": peak / n}


def train_step_seconds(model: torch.nn.Module, batch: int, seq: int, vocab: int, iters: int) -> float:
    tokens = torch.randint(0, vocab, (batch, seq), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def once() -> None:
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return cuda_time(once, iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--adamw", nargs="+", default=["foreach", "fused"], choices=["foreach", "fused"])
    ap.add_argument("--chunk-mib", type=int, help="master_weights' chunk_bytes, in MiB (default: its default)")
    ap.add_argument("--tiny", action="store_true", help="a tiny config (a smoke test of the script)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    config = llama_1b(args.tiny)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    n = sum(p.numel() for p in model.parameters())
    train_s = train_step_seconds(model, args.batch, args.seq, config.vocab_size, max(3, args.iters // 2))
    chunk = args.chunk_mib << 20 if args.chunk_mib else None
    variants = ["plain bf16", *(v for v in args.variants if v != "plain bf16")]
    rows = [measure(v, {impl: True}, model, args.iters, chunk) for impl in args.adamw for v in variants]
    plain_ms = {r["adamw"]: r["step_ms"] for r in rows if r["variant"] == "plain bf16"}
    print(f"# bench_precision_gpu: {n / 1e9:.2f}B params, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{datetime.date.today()}; train step ({args.batch}x{args.seq} tokens, fwd+bwd+AdamW) {train_s * 1e3:.0f} ms\n")
    print("| AdamW | variant | optimizer step ms | vs plain AdamW | overhead, % of train step | persistent B/param "
          "| peak B/param |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        plain = plain_ms[r["adamw"]]
        r["pct_of_train_step"] = 100 * (r["step_ms"] - plain) / (train_s * 1e3)
        print(f"| {r['adamw']} | {r['variant']} | {r['step_ms']:.1f} | {r['step_ms'] / plain:.2f}x | "
              f"{r['pct_of_train_step']:+.1f}% | {r['persistent_bytes_per_param']:.2f} | {r['peak_bytes_per_param']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": n, "device": torch.cuda.get_device_name(), "date": str(datetime.date.today()),
                       "train_step_ms": train_s * 1e3, "batch": args.batch, "seq": args.seq, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
