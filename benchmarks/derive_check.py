"""Derived alias plans against the tables, on real vLLM, without an engine: one process per architecture.

For each architecture, in its own process (vLLM's distributed state is per process), this builds the model
exactly as vLLM's GPU worker does (``EngineArgs(...).create_engine_config()``, world-size-1
``init_distributed_environment`` + ``ensure_model_parallel_initialized`` under ``set_current_vllm_config``,
then ``vllm.model_executor.model_loader.get_model`` with ``load_format="dummy"``), but starts no EngineCore,
no KV cache and no scheduler: seconds, not the ~50 s of an engine. It then derives the plan with the worker's
own code (:class:`ipcbridge.vllm.loader_plan.LoaderPlanMixin`) and compares it to the table's
(:func:`~ipcbridge.mapping.derived.table_plan` over the manifest's config, as ``attach`` does). It also checks
the dry run wrote no weight. Architectures without a table report ``derived`` and how many tensors landed.

Run on the GPU machine (MoE architectures need the WITH_MOE bundle)::

    source .vllm-bundle/install.sh && PYTHONPATH=.:$PYTHONPATH python3 benchmarks/derive_check.py \\
        --json $OUT/derive.json [--archs llama,qwen3_moe] [--jobs 8] [--timeout 300]

Prints one line per architecture as it finishes, then a Markdown table; exits 0 only if every table
architecture's plan equals its table and every table-less one derived a plan. ``--one ARCH --json F`` is the
per-process worker (what the parent runs). ``--cpu-memory`` needs no GPU or vLLM: it records an 8B-shaped
Llama's plan over meta parameters with a vLLM-like loader and reports the recorder's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from _common import llama_8b_config, one, run_child

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

def build_model(config: Any, model_dir: str) -> tuple[Any, Any]:
    """(vLLM model, vllm_config) built as the GPU worker builds it, with dummy weights and no engine."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model

    from ipcbridge.hf import write_model_dir

    write_model_dir(config, model_dir)
    args = EngineArgs(model=model_dir, load_format="dummy", enforce_eager=True, skip_tokenizer_init=True,
                      max_model_len=512, attention_backend="TRITON_ATTN", gpu_memory_utilization=0.05)
    vllm_config = args.create_engine_config()
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    # A file rendezvous: processes running side by side never race for a TCP port.
    init_file = os.path.join(model_dir, "dist-init")
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"file://{init_file}",
                                     local_rank=0, backend="nccl")
        ensure_model_parallel_initialized(1, 1)
        model = get_model(vllm_config=vllm_config)
    return model, vllm_config


class _Worker:
    """What :class:`~ipcbridge.vllm.loader_plan.LoaderPlanMixin` needs of a GPU worker: the config, the model."""

    def __init__(self, model: Any, vllm_config: Any) -> None:
        self.vllm_config, self._model = vllm_config, model

    def _ipcbridge_model(self) -> Any:
        return self._model


def check_one(arch: str) -> dict[str, Any]:
    import torch
    import vllm
    from vllm.config import set_current_vllm_config

    from ipcbridge import mapping
    from ipcbridge.mapping.derived import differences, table_plan
    from ipcbridge.vllm.extension import engine_config_dict
    from ipcbridge.vllm.loader_plan import LoaderPlanMixin
    from tests.vllm.test_vllm_derived import config_for

    t0 = time.perf_counter()
    row: dict[str, Any] = {"arch": arch, "vllm": vllm.__version__}
    with tempfile.TemporaryDirectory(prefix="derive-check-") as d:
        model, vllm_config = build_model(config_for(arch), d)
        row["build_s"] = round(time.perf_counter() - t0, 2)
        params = dict(model.named_parameters())
        before = {n: float(p.detach().double().sum()) for n, p in params.items()}
        worker = type("W", (_Worker, LoaderPlanMixin), {})(model, vllm_config)
        t1 = time.perf_counter()
        with set_current_vllm_config(vllm_config):
            plan = worker._ipcbridge_loader_plan()
        row["derive_s"] = round(time.perf_counter() - t1, 3)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        row["weights_untouched"] = all(float(p.detach().double().sum()) == before[n] for n, p in params.items())
        config = engine_config_dict(vllm_config.model_config)
        row.update(tensors=len(plan.landings), tied=dict(plan.tied), source=plan.source)
        if mapping.has_table(config):
            diff = differences(plan, table_plan({n: tuple(p.shape) for n, p in params.items()}, config))
            row.update(path="table", equal=not diff, differences=diff[:12])
        else:
            plan.views({n: p.detach() for n, p in params.items()})  # binds: every landing fits its tensor
            row.update(path="derived", equal=None, differences=[])
    row["ok"] = row["weights_untouched"] and row["equal"] is not False
    return row


def _child(arch: str, out_dir: str, timeout: float) -> dict[str, Any]:
    """Run ``--one arch`` in a fresh process; a crash or a hang becomes that row's error."""
    return run_child(__file__, arch, out_dir, timeout, cwd=ROOT, tail_chars=1500, ok=False)


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        what = f"ERROR {r['error'][:300]}"
    else:
        eq = {True: "equal", False: f"DIFF {r['differences'][:3]}", None: "(no table)"}[r["equal"]]
        what = f"{r['path']:7s} {r['tensors']:4d} tensors  {eq}  untouched={r['weights_untouched']}"
    return f"| {r['arch']:12s} | {what} | {r.get('seconds', 0):6.1f} s |"


def run_all(archs: list[str], jobs: int, timeout: float, out: str, logs: str | None = None) -> int:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="derive-check-") as tmp, ThreadPoolExecutor(jobs) as pool:
        d = logs or tmp  # per-architecture logs survive the run when --logs names a folder
        os.makedirs(d, exist_ok=True)
        futures = {pool.submit(_child, a, d, timeout): a for a in archs}
        for fut in as_completed(futures):  # each row as soon as it is known: a hung one cannot hide the rest
            rows.append(fut.result())
            print(_line(rows[-1]), flush=True)
            with open(out, "w") as f:
                json.dump(rows, f, indent=1)
    print("\n| arch | result | seconds |\n| --- | --- | --- |")
    for r in rows:
        print(_line(r))
    bad = [r["arch"] for r in rows if not r.get("ok")]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} ok" + (f"; failed: {bad}" if bad else ""))
    return 1 if bad else 0


def cpu_memory() -> dict[str, Any]:
    """Peak RSS of recording an 8B-shaped Llama's plan over meta parameters (no GPU, no vLLM)."""
    import resource

    import torch

    from ipcbridge.mapping.derived import differences, table_plan
    from ipcbridge.vllm.loader_plan import hf_parameters, record_loader_plan
    from tests.vllm.test_loader_plan import meta_vllm_params, vllm_like_loader

    cfg = llama_8b_config()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shapes, tied = hf_parameters(cfg, torch.bfloat16)
    params = meta_vllm_params(shapes, cfg)
    t0 = time.perf_counter()
    plan = record_loader_plan(vllm_like_loader(params, cfg), params, shapes, tied, "llama", "vllm-like loader")
    seconds = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights = sum(torch.Size(s).numel() for s in shapes.values())
    diff = differences(plan, table_plan({n: tuple(p.shape) for n, p in params.items()}, cfg))
    return {"weights": weights, "tensors": len(plan.landings), "equals_table": not diff, "seconds": round(seconds, 2),
            "peak_rss_mib_at_start": round(rss0), "peak_rss_mib_after": round(rss1),
            "index_tensors_alone_mib": round(8 * weights / 2**20)}


def main() -> int:
    from tests.vllm.test_vllm_derived import DERIVED_ARCHS, TABLE_ARCHS  # the tests' lists and configs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--archs", default=",".join(TABLE_ARCHS + DERIVED_ARCHS))
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per architecture's process")
    ap.add_argument("--logs", help="keep each architecture's log (and result) in this folder")
    ap.add_argument("--one", help="the per-architecture worker: check this one, in this process")
    ap.add_argument("--cpu-memory", action="store_true")
    args = ap.parse_args()
    if args.cpu_memory:
        result = cpu_memory()
        print(json.dumps(result, indent=1))
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        return 0
    if args.one:
        ok = one(check_one, args.one, args.json, error_chars=1500, ok=False).get("ok")
        # The row is written. Tearing vLLM's distributed state down at exit hung on the H200 (every child sat
        # out --timeout, 2026-11-30), so the child leaves without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if ok else 1)
    return run_all([a for a in args.archs.split(",") if a], max(1, args.jobs), args.timeout, args.json, args.logs)


if __name__ == "__main__":
    sys.exit(main())
