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

import ipcbridge
from ipcbridge.vllm.colocate import VllmEngine
from ipcbridge.vllm.testing import TESTING_EXTENSION_QUALNAME

GIB = 2**30


def llama_8b_config(tiny: bool = False) -> Any:
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    # Llama-3.1-8B's shapes: 8.03 B parameters, 16.06 GB in bf16.
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False)


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
    args = ap.parse_args()

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
    with VllmEngine(config, gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=512,
                    num_gpu_blocks=None, dtype="bfloat16",
                    worker_extension_cls=TESTING_EXTENSION_QUALNAME) as engine:
        import vllm

        res["vllm"] = vllm.__version__
        res["engine_start_s"] = time.perf_counter() - t0
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

    print(json.dumps(res, indent=1, default=str), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    print(table(res))


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
         f"fence {1e3 * r['fence_median_s']:.2f} ms median (p90 {1e3 * r['fence_p90_s']:.2f} ms)",
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
