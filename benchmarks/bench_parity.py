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
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
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


def _child(spec: str, out_dir: str, timeout: float) -> dict[str, Any]:
    """``--one spec`` in a fresh process; a crash or a hang becomes the row's error."""
    safe = "".join(c if c.isalnum() else "_" for c in spec)
    path, log = os.path.join(out_dir, f"{safe}.json"), os.path.join(out_dir, f"{safe}.log")
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", spec, "--json", path],
                                stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if os.path.exists(path):
        with open(path) as f:
            row = json.load(f)
    else:
        with open(log) as f:
            row = {"arch": spec, "error": f"process ended ({rc}) without a result: ...{f.read()[-800:]}"}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


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
        try:
            row = run(args.one)
        except Exception as e:  # reported in this architecture's row
            import traceback

            traceback.print_exc()
            row = {"arch": args.one, "error": f"{type(e).__name__}: {e}"[:500]}
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
        return 1 if "error" in row else 0
    return run_all([s for s in args.archs.split(",") if s], max(1, args.jobs), args.timeout, args.json)


if __name__ == "__main__":
    sys.exit(main())
