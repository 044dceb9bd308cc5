"""Does training a bf16 engine's weights in place learn like fp32? CPU benchmark of ``master_weights``.

A small Llama (random weights, bf16) trains on a fixed stream of random token batches with AdamW, once
per variant:

* ``plain bf16``: AdamW straight on the bf16 weights (what aliasing does without a wrapper);
* ``remainder`` / ``fp32`` / ``stochastic``: ``ipcbridge.optim.master_weights(opt, mode)``;
* the reference is classic mixed precision: a separate fp32 master per weight, AdamW on the master,
  the bf16 weights its round-to-nearest copy.

Columns: ``changed/step`` is the mean fraction of bf16 weights whose value changed in a step (an update
rounded away leaves it unchanged); ``!= ref`` the fraction of bf16 weights that differ from the
reference's after N steps; ``dist/ref move`` the L2 distance to the reference's weights relative to how
far the reference moved from the start; ``extra B/param`` the wrapper's persistent bytes per parameter.

Run (about 1 minute on 2 CPU cores)::

    PYTHONPATH=. python benchmarks/bench_precision.py [--steps 24] [--lrs 1e-6 1e-5] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from typing import Any

import torch

from ipcbridge.optim import master_weights
from tests.optim.reference import ClassicMixedPrecision

VARIANTS = ("plain bf16", "remainder", "fp32", "stochastic")


def make_model(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.bfloat16)


def batches(steps: int, vocab: int = 512) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (8, 64), generator=g) for _ in range(steps)]


def train(variant: str, lr: float, data: list[torch.Tensor]) -> tuple[list[torch.Tensor], float, float]:
    """Train one variant; returns its final weights, mean fraction changed per step, extra bytes/param."""
    model = make_model(0)
    params = list(model.parameters())
    if variant == "reference":
        opt: Any = ClassicMixedPrecision(model, lambda masters: torch.optim.AdamW(masters, lr=lr))
    elif variant == "plain bf16":
        opt = torch.optim.AdamW(params, lr=lr)
    else:
        opt = master_weights(torch.optim.AdamW(params, lr=lr), variant, seed=0)
    changed = []
    for tokens in data:
        before = [p.detach().clone() for p in params]
        model.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        n_changed = sum(int((b != p.detach()).sum()) for b, p in zip(before, params, strict=True))
        changed.append(n_changed / sum(p.numel() for p in params))
    extra = opt.extra_bytes() / sum(p.numel() for p in params) if hasattr(opt, "extra_bytes") else 0.0
    return [p.detach().clone() for p in params], sum(changed) / len(changed), extra


def compare(weights: list[torch.Tensor], ref: list[torch.Tensor], start: list[torch.Tensor]) -> tuple[float, float]:
    differ = sum(int((w != r).sum()) for w, r in zip(weights, ref, strict=True))
    total = sum(r.numel() for r in ref)
    dist = sum(float((w.float() - r.float()).pow(2).sum()) for w, r in zip(weights, ref, strict=True)) ** 0.5
    moved = sum(float((r.float() - s.float()).pow(2).sum()) for r, s in zip(ref, start, strict=True)) ** 0.5
    return differ / total, dist / moved if moved else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-6, 1e-5])
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = batches(args.steps)
    start = [p.detach().clone() for p in make_model(0).parameters()]
    rows = []
    for lr in args.lrs:
        ref, ref_changed, _ = train("reference", lr, data)
        rows.append({"lr": lr, "variant": "reference (fp32 master)", "changed_per_step": ref_changed,
                     "differ_from_ref": 0.0, "dist_over_ref_move": 0.0, "extra_bytes_per_param": 4.0})
        for variant in VARIANTS:
            weights, changed, extra = train(variant, lr, data)
            differ, dist = compare(weights, ref, start)
            rows.append({"lr": lr, "variant": variant, "changed_per_step": changed, "differ_from_ref": differ,
                         "dist_over_ref_move": dist, "extra_bytes_per_param": extra})
    print(f"# bench_precision: {args.steps} AdamW steps, bf16 Llama "
          f"({sum(t.numel() for t in start) / 1e6:.1f}M params), {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {datetime.date.today()}\n")
    print("| lr | variant | changed/step | != ref after N | dist/ref move | extra B/param |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['lr']:g} | {r['variant']} | {r['changed_per_step']:.1%} | {r['differ_from_ref']:.2%} | "
              f"{r['dist_over_ref_move']:.3f} | {r['extra_bytes_per_param']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "date": str(datetime.date.today()), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
