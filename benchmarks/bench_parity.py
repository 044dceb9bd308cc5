"""Logprob parity between the attached HF model and real vLLM, per architecture (GPU machine, vLLM bundle).

For each architecture: a tiny config, vLLM with dummy weights and prefix caching on, weights set to
N(0, 0.05) through the bridge, greedy and temperature-1 completions of four prompts, and the mean / max
|logprob_HF - logprob_vLLM| over every generated token. ``gemma3_text`` runs in variants that test the
parity-gap hypotheses (docs/mapping.md): ``gemma3_text:window=N`` sets sliding_window (default 128, longer
than every sequence here, so sliding layers attend like global ones), ``:window=4`` makes the window bite.

    python benchmarks/bench_parity.py --json $OUT/parity.json [--archs gemma3_text,gemma3_text:window=4] [--jobs 3]

Each architecture runs in its own process (``--one SPEC``: one engine, one CUDA context, nothing shared),
``--jobs`` at a time; an architecture that fails while others run beside it (vLLM's start-up memory
check sees their memory) is retried once alone at the end, so a row's error is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from _common import one, run_child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT = ("llama,qwen2,qwen3,mistral,gemma,gemma2,phi3,gpt2,opt,gemma3_text,gemma3_text:window=4,"
           "gemma3_text:window=16,qwen3_moe,qwen2_moe,mixtral,olmo2,granite,stablelm,cohere")


def config_of(spec: str) -> Any:
    from tests.vllm.test_vllm_derived import config_for

    arch, _, variant = spec.partition(":")
    cfg = config_for(arch)
    for item in filter(None, variant.split(",")):
        key, _, value = item.partition("=")
        setattr(cfg, {"window": "sliding_window"}.get(key, key), int(value))
    return cfg


def run(spec: str) -> dict[str, Any]:
    import ipcbridge
    from ipcbridge.vllm.colocate import VllmEngine
    from ipcbridge.vllm.extension import EXTENSION_QUALNAME
    from ipcbridge.vllm.testing import init_weights_
    from tests.vllm.vllm_helpers import PROMPTS, parity

    with VllmEngine(config_of(spec), gpu_memory_utilization=0.2, init="dummy", enable_prefix_caching=True,
                    worker_extension_cls=EXTENSION_QUALNAME) as engine:
        bridge = ipcbridge.connect(engine)
        try:
            with bridge.update():
                init_weights_(bridge.model, 0, 0.05)
            outs = engine.generate(PROMPTS, max_tokens=16, temperature=0.0)
            outs += engine.generate(PROMPTS, max_tokens=16, temperature=1.0, seed=1234)
            return {"arch": spec, **parity(bridge.model, outs, PROMPTS * 2)}
        finally:
            bridge.close()


def _child(spec: str, out_dir: str, timeout: float) -> dict[str, Any]:
    """``--one spec`` in a fresh process; a crash or a hang becomes the row's error."""
    return run_child(__file__, spec, out_dir, timeout, cwd=ROOT)


def _line(r: dict[str, Any]) -> str:
    line = r.get("error") or f"mean {r['mean_abs_diff']:.4f}  max {r['max_abs_diff']:.4f}  ({r['tokens']} tokens)"
    return f"{r['arch']:28s} {line}  [{r.get('seconds', 0)} s]"


def run_all(specs: list[str], jobs: int, timeout: float, out: str) -> int:
    rows: dict[str, dict[str, Any]] = {}

    def save() -> None:
        with open(out, "w") as f:
            json.dump([rows[s] for s in specs if s in rows], f, indent=1)

    with tempfile.TemporaryDirectory(prefix="parity-") as d:
        with ThreadPoolExecutor(jobs) as pool:
            for spec, row in zip(specs, pool.map(lambda s: _child(s, d, timeout), specs), strict=True):
                rows[spec] = row
                print(_line(row), flush=True)
                save()
        for spec in [s for s in specs if "error" in rows[s]] if jobs > 1 else []:
            rows[spec] = {**_child(spec, d, timeout), "retried_alone": True}
            print(_line(rows[spec]), "(retried alone)", flush=True)
            save()
    return 1 if any("error" in r for r in rows.values()) else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--archs", default=DEFAULT)
    ap.add_argument("--jobs", type=int, default=3, help="architectures (engines) at a time")
    ap.add_argument("--timeout", type=float, default=420.0, help="seconds per architecture's process")
    ap.add_argument("--one", help="the per-architecture worker: measure this spec in this process")
    args = ap.parse_args()
    if args.one:
        return 1 if "error" in one(run, args.one, args.json, error_chars=500) else 0
    return run_all([s for s in args.archs.split(",") if s], max(1, args.jobs), args.timeout, args.json)


if __name__ == "__main__":
    sys.exit(main())
