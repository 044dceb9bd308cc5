"""Logprob parity between the attached HF model and real vLLM, per architecture (GPU machine, vLLM bundle).

For each architecture: a tiny config, vLLM with dummy weights and prefix caching on, weights set to
N(0, 0.05) through the bridge, greedy and temperature-1 completions of four prompts, and the mean / max
|logprob_HF - logprob_vLLM| over every generated token. ``gemma3_text`` runs in variants that test the
parity-gap hypotheses (docs/mapping.md): ``gemma3_text:window=N`` sets sliding_window (default 128, longer
than every sequence here, so sliding layers attend like global ones), ``:window=4`` makes the window bite.

    python benchmarks/bench_parity.py --json $OUT/parity.json [--archs llama,gemma3_text,gemma3_text:window=4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

import torch

DEFAULT = ("llama,qwen2,qwen3,mistral,gemma,gemma2,phi3,gpt2,opt,gemma3_text,gemma3_text:window=4,"
           "gemma3_text:window=16,qwen3_moe,qwen2_moe,mixtral,olmo2,granite,stablelm,cohere")
PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11, 12], [300, 301, 302, 303, 304]]


def config_of(spec: str) -> Any:
    from tests.vllm.test_vllm_derived import config_for

    arch, _, variant = spec.partition(":")
    cfg = config_for(arch)
    for item in filter(None, variant.split(",")):
        key, _, value = item.partition("=")
        setattr(cfg, {"window": "sliding_window"}.get(key, key), int(value))
    return cfg


def diffs(model: torch.nn.Module, outs: list) -> list[float]:
    from ipcbridge.logprobs import sequence_logprobs

    out = []
    for prompt, o in zip(PROMPTS, outs, strict=True):
        out += [abs(a - b) for a, b in zip(sequence_logprobs(model, prompt, o.token_ids), o.logprobs, strict=True)]
    return out


def run(spec: str) -> dict[str, Any]:
    import ipcbridge
    from ipcbridge.vllm.colocate import VllmEngine
    from ipcbridge.vllm.extension import EXTENSION_QUALNAME
    from ipcbridge.vllm.testing import init_weights_

    with VllmEngine(config_of(spec), gpu_memory_utilization=0.2, init="dummy", enable_prefix_caching=True,
                    worker_extension_cls=EXTENSION_QUALNAME) as engine:
        bridge = ipcbridge.connect(engine)
        try:
            with bridge.update():
                init_weights_(bridge.model, 0, 0.05)
            d = diffs(bridge.model, engine.generate(PROMPTS, max_tokens=16, temperature=0.0))
            d += diffs(bridge.model, engine.generate(PROMPTS, max_tokens=16, temperature=1.0, seed=1234))
        finally:
            bridge.close()
    return {"arch": spec, "mean_abs_diff": statistics.fmean(d), "max_abs_diff": max(d), "tokens": len(d)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--archs", default=DEFAULT)
    args = ap.parse_args()
    rows = []
    for spec in args.archs.split(","):
        try:
            rows.append(run(spec))
        except Exception as e:  # one architecture failing must not hide the others' figures
            rows.append({"arch": spec, "error": f"{type(e).__name__}: {e}"[:500]})
        r = rows[-1]
        line = r.get("error") or f"mean {r['mean_abs_diff']:.4f}  max {r['max_abs_diff']:.4f}  ({r['tokens']} tokens)"
        print(f"{spec:28s} {line}", flush=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
