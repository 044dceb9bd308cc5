"""ipcbridge vs copy-based weight sync, against real vLLM, with an 8B-shaped Llama (dummy weights).

Measured side by side in one process, on one engine:

* **ipcbridge**: ``connect`` time (manifest RPC + opening the handles + binding a meta-device HF model), the
  trainer's weight memory (bytes allocated by attaching; parameters outside vLLM's memory), and the fence
  (``with bridge.update(): pass``: device sync, ``reset_prefix_cache``, publishing the version).
* **copy-based sync**, as frameworks do it today (vLLM's ``rlhf_colocate`` example): the trainer holds its
  *own* copy of the weights, exports CUDA IPC handles of them, and the worker opens them and copies them in
  with ``model.load_weights`` (here the handles travel as an ipcbridge manifest, JSON, instead of pickle).
* **vLLM's own IPC weight-transfer engine** (``weight_transfer_config={"backend": "ipc"}``) is tried; it is
  reported as not run when it cannot be imported (it imports ``ray`` at module level).

Run on the GPU machine (about 3 minutes)::

    source .vllm-bundle/install.sh && PYTHONPATH=. python3 benchmarks/bench_vllm.py --json $OUT/bench.json

Prints a Markdown table last. ``--tiny`` runs the same on a tiny config (a smoke test of the script).

Two more modes, each printing a table and writing JSON:

* ``--kv-table``: the fence against the KV-cache size. One fresh process per (shape, utilisation) row
  (``--kv-row SHAPE:UTIL``, default the four rows of docs/benchmarks.md); each starts vLLM with the KV cache
  sized by vLLM and times the fence with ``kv_reset="always"`` (``reset_prefix_cache`` walks every block)
  and ``kv_reset="salted"`` (no reset; Note [stale KV: reset or salt]), the reset alone, and the RPC.
* ``--async-fence``: the AsyncLLM fence (tiny config), ``always`` and ``salted``, next to vLLM's public
  ``pause_generation(mode="wait")`` + ``resume_generation()`` round trip (which ends in a 20 ms sleep).

    PYTHONPATH=. python3 benchmarks/bench_vllm.py --kv-table --json $OUT/kv.json
    PYTHONPATH=. python3 benchmarks/bench_vllm.py --async-fence --json $OUT/async.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from typing import Any

import torch
from _common import llama_8b_config, run_group

import ipcbridge
from ipcbridge.vllm.colocate import VllmEngine
from ipcbridge.vllm.testing import TESTING_EXTENSION_QUALNAME

GIB = 2**30


def qwen_05b_config() -> Any:
    from transformers import Qwen2Config

    # Qwen2.5-0.5B's shapes: 0.49 B parameters, tied embeddings.
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True)


SHAPES = {"0.5b": qwen_05b_config, "8b": lambda: llama_8b_config(False), "tiny": lambda: llama_8b_config(True)}
KV_ROWS = ("0.5b:0.3", "0.5b:0.85", "8b:0.4", "8b:0.85")


def allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def device_used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


def timed(fn: Any, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def fence_median(bridge: Any, n: int) -> float:
    def fence() -> None:
        with bridge.update():
            pass

    fence()  # warm-up
    return statistics.median(timed(fence, n))


def kv_row(shape: str, util: float, fences: int) -> dict[str, Any]:
    """One row of the fence-vs-KV-size table, in this process."""
    from ipcbridge.vllm.endpoints import LLMEndpoint

    torch.empty(1, device="cuda")
    with VllmEngine(SHAPES[shape](), gpu_memory_utilization=util, max_model_len=512, num_gpu_blocks=None,
                    dtype="bfloat16", init="dummy", kv_reset="salted") as engine:
        import vllm

        llm = engine.llm
        row: dict[str, Any] = {"shape": shape, "gpu_memory_utilization": util, "vllm": vllm.__version__,
                               "kv_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks}
        ep = engine.ipcbridge_endpoint()
        row["features"] = ep.features.describe()
        salted = ipcbridge.connect(engine)
        row["fence_salted_ms"] = 1e3 * fence_median(salted, fences)
        always = ipcbridge.connect(LLMEndpoint(llm, kv_reset="always"))
        row["fence_always_ms"] = 1e3 * fence_median(always, fences)
        row["reset_prefix_cache_ms"] = 1e3 * statistics.median(timed(llm.reset_prefix_cache, 5))
        row["rpc_roundtrip_ms"] = 1e3 * statistics.median(timed(ep.engine_weight_version, 5))
        always.close()
        salted.close()
    return row


def kv_table(rows: list[str], fences: int) -> list[dict[str, Any]]:
    """Each row in a fresh interpreter (a clean GPU per engine); a failed row is reported, not fatal."""
    import subprocess
    import sys

    out = []
    for spec in rows:
        cmd = [sys.executable, os.path.abspath(__file__), "--kv-row", spec, "--fences", str(fences)]
        try:  # its own session, killed whole on timeout: no EngineCore left holding the GPU
            r = run_group(cmd, 580, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except subprocess.TimeoutExpired:
            out.append({"row": spec, "error": "timed out after 580 s"})
            print(json.dumps(out[-1]), flush=True)
            continue
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("KVROW ")]
        out.append(json.loads(lines[-1][6:]) if lines else {"row": spec, "error": (r.stderr or r.stdout)[-2000:]})
        print(json.dumps(out[-1]), flush=True)
    return out


def kv_markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| shape | gpu_memory_utilization | KV blocks | fence, kv_reset=always | fence, kv_reset=salted | "
           "reset_prefix_cache alone | collective_rpc round trip | vLLM |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['row']} | failed: see JSON | | | | | | |")
            continue
        out.append(f"| {r['shape']} | {r['gpu_memory_utilization']} | {r['kv_blocks']:,} | {r['fence_always_ms']:.2f} ms "
                   f"| {r['fence_salted_ms']:.2f} ms | {r['reset_prefix_cache_ms']:.2f} ms | "
                   f"{r['rpc_roundtrip_ms']:.2f} ms | {r['vllm']} |")
    return "\n".join(out)


def async_fence(fences: int) -> dict[str, Any]:
    """The AsyncLLM fence (tiny llama, dummy weights), next to vLLM's own pause/resume round trip."""
    import asyncio
    import tempfile

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from ipcbridge.hf import write_model_dir
    from ipcbridge.vllm.endpoints import AsyncLLMEndpoint

    res: dict[str, Any] = {}

    async def main() -> None:
        model = write_model_dir(llama_8b_config(True), tempfile.mkdtemp(prefix="ipcbridge-bench-"))
        args = AsyncEngineArgs(model=model, load_format="dummy", enforce_eager=True, skip_tokenizer_init=True,
                               gpu_memory_utilization=0.3, max_model_len=512, attention_backend="TRITON_ATTN",
                               worker_extension_cls="ipcbridge.vllm.WorkerExtension")
        engine = AsyncLLM.from_engine_args(args)
        try:
            for mode in ("always", "salted"):
                ep = AsyncLLMEndpoint(engine, kv_reset=mode)
                res["features"] = ep.features.describe()
                bridge = await asyncio.to_thread(ipcbridge.connect, ep)
                res[f"fence_{mode}_ms"] = 1e3 * await asyncio.to_thread(fence_median, bridge, fences)
                bridge.close()

            async def public() -> None:
                await engine.pause_generation(mode="wait", clear_cache=False)
                await engine.resume_generation()

            ts = []
            for _ in range(fences):
                t0 = time.perf_counter()
                await public()
                ts.append(time.perf_counter() - t0)
            res["public_pause_resume_ms"] = 1e3 * statistics.median(ts)
            res["kv_blocks"] = engine.vllm_config.cache_config.num_gpu_blocks
        finally:
            engine.shutdown()

    asyncio.run(main())
    return res


def attach_profile(engine: Any) -> dict[str, Any]:
    """Where ``connect`` spends its time beyond the manifest RPC: cProfile's top functions, cumulative."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    b = ipcbridge.connect(engine)
    total = time.perf_counter() - t0
    prof.disable()
    b.close()
    stats = pstats.Stats(prof)
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)  # type: ignore[attr-defined]
    rows = [{"function": f"{fn[0].rsplit('/', 2)[-1]}:{fn[1]}({fn[2]})", "cumulative_s": round(v[3], 4),
             "calls": v[1]} for fn, v in top[:25]]
    return {"connect_s": total, "top_cumulative": rows}


def try_vllm_ipc_engine() -> str:
    try:
        import vllm.distributed.weight_transfer.ipc_engine  # noqa: F401
    except Exception as e:  # report, don't fail: it is the comparison, not the subject
        return f"not run: importing it fails here ({type(e).__name__}: {e})"
    return "importable (not benchmarked: it needs weight_transfer_config and pickled handles)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    ap.add_argument("--fences", type=int, default=20)
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    ap.add_argument("--kv-table", action="store_true", help="the fence vs the KV-cache size")
    ap.add_argument("--kv-row", action="append", default=None, help="SHAPE:UTIL, e.g. 0.5b:0.85 (repeatable)")
    ap.add_argument("--async-fence", action="store_true", help="the AsyncLLM fence")
    args = ap.parse_args()
    if args.kv_table or args.kv_row or args.async_fence:
        return other_modes(args)

    config = llama_8b_config(args.tiny)
    res: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "config": "tiny llama" if args.tiny else "Llama-3.1-8B shapes (dummy weights, bf16)",
    }
    torch.cuda.init()
    torch.empty(1, device="cuda")  # the trainer's CUDA context exists before any baseline is read

    t0 = time.perf_counter()
    # num_gpu_blocks=None: vLLM sizes the KV cache from gpu_memory_utilization, as in production.
    # The testing extension: the copy-based baseline below calls its ipcbridge_load_weights.
    # init="dummy": vLLM's own dummy weights, as in the 2026-11-21 run this table is compared with. An HF-style
    # random init (N(0, 0.02), norms 1) makes 32 bf16 layers disagree by up to ~0.16 nats between HF's and
    # vLLM's kernels (measured 2026-11-30), which is noise of a random deep model, not of the binding.
    with VllmEngine(config, gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=512,
                    num_gpu_blocks=None, dtype="bfloat16", init="dummy",
                    worker_extension_cls=TESTING_EXTENSION_QUALNAME) as engine:
        import vllm

        res["vllm"] = vllm.__version__
        res["engine_start_s"] = time.perf_counter() - t0
        res["kv_reset"] = engine.kv_reset  # "salted": the fence does not reset (Note [stale KV: reset or salt])
        res["kv_blocks"] = engine.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
        endpoint = engine.ipcbridge_endpoint()
        info = endpoint.info()
        res["engine_weight_bytes"] = info["weight_bytes"]

        # --- ipcbridge: attach ------------------------------------------------------------------------
        a0, d0 = allocated(), device_used()
        t0 = time.perf_counter()
        manifest = endpoint.manifest()
        res["manifest_rpc_s"] = time.perf_counter() - t0
        res["manifest_json_bytes"] = len(manifest.to_json())
        bridge = ipcbridge.connect(engine)
        res["connect_s"] = bridge.attach_seconds
        res["attach_allocated_bytes"] = allocated() - a0
        res["attach_device_used_delta_bytes"] = device_used() - d0
        report = bridge.check(prompt=[1, 2, 3, 4], max_tokens=8)
        res["coverage"] = f"{report.engine_tensors_used}/{report.engine_tensors} vLLM tensors, " \
                          f"{report.hf_parameters} HF parameters, {len(report.parameters_outside_engine)} outside"
        res["trainer_weight_bytes"] = report.trainer_weight_bytes
        res["model_weight_bytes"] = report.model_weight_bytes
        res["parity_dummy_mean"] = report.logprob_mean_abs_diff
        res["parity_dummy_max"] = report.logprob_max_abs_diff

        # --- ipcbridge: fence -------------------------------------------------------------------------
        def fence() -> None:
            with bridge.update():
                pass

        fence()  # warm-up
        bridge.fence_seconds.clear()
        for _ in range(args.fences):
            fence()
        fs = sorted(bridge.fence_seconds)
        res["fence_median_s"] = statistics.median(fs)
        res["fence_p90_s"] = fs[int(0.9 * (len(fs) - 1))]
        # Where the fence's time goes: vLLM's reset_prefix_cache walks every KV block in Python, so it grows
        # with the KV cache, not the model; one collective_rpc round trip publishes the version.
        res["reset_prefix_cache_median_s"] = statistics.median(timed(engine.llm.reset_prefix_cache, 5))
        res["rpc_roundtrip_median_s"] = statistics.median(timed(endpoint.engine_weight_version, 5))
        res["engine_weight_version"] = endpoint.engine_weight_version()
        res["bridge_weight_version"] = bridge.weight_version

        # --- copy-based sync (rlhf_colocate style) ------------------------------------------------------
        a1 = allocated()
        own = {k: v.detach().clone() for k, v in bridge.model.state_dict().items()}  # the trainer's own copy
        res["copy_trainer_weight_bytes"] = allocated() - a1
        syncs: list[dict[str, float]] = []

        def copy_sync() -> None:
            t = time.perf_counter()
            torch.cuda.synchronize()
            m = ipcbridge.export(own, config=None, layout="hf")  # handles of the trainer's own weights
            t_export = time.perf_counter() - t
            rep = endpoint.rpc("ipcbridge_load_weights", m.to_json())
            engine.llm.reset_prefix_cache()
            syncs.append({"export_s": t_export, "worker_open_s": rep["open_s"], "worker_load_s": rep["load_s"],
                          "tensors": rep["tensors"]})
            torch.cuda.ipc_collect()

        copy_sync()  # warm-up
        syncs.clear()
        sync_times = timed(copy_sync, args.syncs)
        res["copy_sync_median_s"] = statistics.median(sync_times)
        res["copy_sync_all_s"] = sync_times
        res["copy_sync_parts_median"] = {k: statistics.median(s[k] for s in syncs)
                                         for k in ("export_s", "worker_open_s", "worker_load_s")}
        res["copy_sync_tensors"] = syncs[0]["tensors"]
        # The engine now holds the trainer's copy again: the same numbers, so parity is unchanged.
        post = bridge.check(prompt=[1, 2, 3, 4], max_tokens=8)
        res["parity_after_copy_sync_mean"] = post.logprob_mean_abs_diff
        own.clear()  # free the trainer's copy
        torch.cuda.empty_cache()

        res["vllm_ipc_engine"] = try_vllm_ipc_engine()
        bridge.close()
        res["attach_profile"] = attach_profile(engine)

    print(json.dumps(res, indent=1, default=str), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    print(table(res))


def other_modes(args: Any) -> None:
    if args.kv_row and not args.kv_table:  # a child of --kv-table: one row, on stdout
        shape, util = args.kv_row[0].split(":")
        print("KVROW " + json.dumps(kv_row(shape, float(util), args.fences)), flush=True)
        return
    import torch as _torch

    res: dict[str, Any] = {"date": datetime.date.today().isoformat(), "device": _torch.cuda.get_device_name(0),
                           "torch": _torch.__version__}
    if args.kv_table:
        res["kv_table"] = kv_table(args.kv_row or list(KV_ROWS), args.fences)
    if args.async_fence:
        res["async_fence"] = async_fence(args.fences)
    print(json.dumps(res, indent=1, default=str), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    if args.kv_table:
        print(kv_markdown(res["kv_table"]))


def table(r: dict[str, Any]) -> str:
    gb = r["engine_weight_bytes"] / 1e9
    cs = r["copy_sync_parts_median"]
    rows = [
        ("Weights served by vLLM", f"{gb:.2f} GB", f"{gb:.2f} GB", "-"),
        ("Trainer weight memory", f"{r['attach_allocated_bytes'] / 2**20:.2f} MiB allocated by attaching; "
         f"{r['trainer_weight_bytes']} B of parameters outside vLLM",
         f"{r['copy_trainer_weight_bytes'] / 1e9:.2f} GB (its own copy)", "-"),
        ("Set-up", f"connect {r['connect_s']:.2f} s (manifest RPC {r['manifest_rpc_s']:.2f} s)", "-", "-"),
        ("Per update, after optimizer.step()",
         f"fence {1e3 * r['fence_median_s']:.2f} ms median (p90 {1e3 * r['fence_p90_s']:.2f} ms; "
         f"kv_reset={r.get('kv_reset')}, {r.get('kv_blocks')} KV blocks)",
         f"{r['copy_sync_median_s']:.3f} s median of {len(r['copy_sync_all_s'])} (export "
         f"{1e3 * cs['export_s']:.0f} ms, worker open {1e3 * cs['worker_open_s']:.0f} ms, "
         f"load_weights {1e3 * cs['worker_load_s']:.0f} ms)", r["vllm_ipc_engine"]),
        ("Bytes copied per update", "0", f"{gb:.2f} GB", "-"),
        ("Fence parts (both columns pay them)", f"reset_prefix_cache {1e3 * r['reset_prefix_cache_median_s']:.2f} ms, "
         f"collective_rpc round trip {1e3 * r['rpc_roundtrip_median_s']:.2f} ms", "the same", "-"),
    ]
    out = [f"device: {r['device']}, vLLM {r.get('vllm')}, torch {r['torch']}, {r['date']}; {r['config']}", "",
           "| | ipcbridge (zero-copy) | copy-based sync (IPC handles -> load_weights) | vLLM IPC weight-transfer engine |",
           "| --- | --- | --- | --- |"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(out)


if __name__ == "__main__":
    main()
    os._exit(0)  # vLLM's background threads can hang interpreter teardown after the engine is gone
