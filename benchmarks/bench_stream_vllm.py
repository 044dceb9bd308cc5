"""ipcbridge.stream() into real vLLM on other GPUs, against one contiguous NCCL broadcast of the same bytes.

For each model shape (``--models 1b,8b``: Llama-3.2-1B- and Llama-3.1-8B-shaped, bf16, dummy weights in vLLM)
and each receiver (``--receivers vllm,ipcbridge``: vLLM's own NCCL receiver, fed with no ipcbridge code in
the engine; ipcbridge's, which writes into the fused parameters), in one run:

1. **ceiling** (before the engine starts): helper processes on the engine's GPUs (``--gpus``) join a private NCCL group with the trainer
   (cuda:``--trainer-gpu``) and time one contiguous broadcast of the stream's wire bytes (median of reps);
2. a ``vllm.LLM`` on ``--gpus`` (``tensor_parallel_size=--tp``) with vLLM's NCCL weight transfer and
   ipcbridge's extension; the trainer's HF model on its own GPU; ``ipcbridge.stream(llm, model,
   receiver=...)``;
3. ``--pushes`` timed pushes after 2 warm-ups: the transfer time (``push_seconds``: start to the engine's
   last load) and the whole fenced ``push()``; the ratio ceiling/transfer;
4. peak extra memory on the trainer (``max_memory_allocated`` over the pushes minus before the stream) and on
   each engine GPU (``ipcbridge_stream_memory``), and ``--flat`` further pushes with allocated memory read
   before and after on both sides (flat = unchanged);
5. ``--check``: a decisive fenced optimizer step, then vLLM's greedy continuation == the trainer model's.

Run on ``nvidia-h200-x2`` (about 10 minutes for both shapes)::

    PYTHONPATH=. NCCL_NVLS_ENABLE=0 python3 benchmarks/bench_stream_vllm.py --json $OUT/stream.json --check

Issue 15 (``nvidia-h200-x4``, TP=2 on cuda:1,2; only vLLM's receiver shards)::

    PYTHONPATH=. NCCL_NVLS_ENABLE=0 python3 benchmarks/bench_stream_vllm.py --tp 2 --gpus 1,2 \\
        --receivers vllm --json $OUT/stream_tp2.json --check

Issue 12, item 2 (one H200): ``--same-gpu`` starts the engine on the trainer's GPU with
``enable_sleep_mode=True`` (which ``connect()`` refuses) and streams through the trainer's shared CUDA IPC
buffer (receiver ``ipc``); the ceiling is then one contiguous device-to-device copy of the same bytes on
that GPU, and before the timed pushes the engine goes through a sleep/wake cycle::

    PYTHONPATH=. python3 benchmarks/bench_stream_vllm.py --same-gpu --json $OUT/stream_same_gpu.json --check

``--tiny`` runs everything on a tiny config (a smoke test of the script). Prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

MIB = 2**20
#: A ceiling peer that died must not hold the trainer in a broadcast for NCCL's default 10 minutes.
CEILING_TIMEOUT = datetime.timedelta(seconds=120)
PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [300, 301, 302]]


def llama_config(shape: str) -> Any:
    from transformers import LlamaConfig

    common = dict(vocab_size=128256, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                  rope_theta=500000.0, bos_token_id=1, eos_token_id=2)
    if shape == "1b":
        return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
                           tie_word_embeddings=True, **common)
    if shape == "8b":
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128,
                           tie_word_embeddings=False, **common)
    if shape == "tiny":
        return LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                           bos_token_id=1, eos_token_id=2)
    raise SystemExit(f"unknown shape {shape!r}")


# ---- the ceiling: one contiguous broadcast ------------------------------------------------------------------


def _ceiling_peer(rank: int, world: int, host: str, port: int, nbytes: int, reps: int) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(0)  # this child sees only its engine GPU
    store = dist.TCPStore(host, port, world, False, timeout=datetime.timedelta(seconds=300))
    pg = dist.ProcessGroupNCCL(dist.PrefixStore("ceiling", store), rank, world, CEILING_TIMEOUT)
    buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    opts = dist.BroadcastOptions()
    for _ in range(reps + 2):
        pg.allreduce([torch.zeros(1, device="cuda")]).wait()
        pg.broadcast([buf], opts).wait()
    torch.cuda.synchronize()
    pg.allreduce([torch.zeros(1, device="cuda")]).wait()
    torch.cuda.synchronize()


def ceiling(nbytes: int, gpus: list[str], trainer: torch.device, reps: int) -> dict[str, Any]:
    """Median seconds of one contiguous broadcast of ``nbytes`` from ``trainer`` to one process per engine GPU."""
    import multiprocessing as mp

    import torch.distributed as dist

    from tests.vllm.vllm_helpers import visible_devices

    world = 1 + len(gpus)
    store = dist.TCPStore("127.0.0.1", 0, world, True, timeout=datetime.timedelta(seconds=300),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = []
    for i, g in enumerate(gpus):
        with visible_devices(g):  # the spawned child sees only its engine GPU
            p = ctx.Process(target=_ceiling_peer, args=(i + 1, world, "127.0.0.1", store.port, nbytes, reps))
            p.start()
        procs.append(p)
    pg = dist.ProcessGroupNCCL(dist.PrefixStore("ceiling", store), 0, world, CEILING_TIMEOUT)
    buf = torch.empty(nbytes, dtype=torch.uint8, device=trainer)
    times = []
    for i in range(reps + 2):
        pg.allreduce([torch.zeros(1, device=trainer)]).wait()
        torch.cuda.synchronize(trainer)
        t0 = time.perf_counter()
        pg.broadcast([buf], dist.BroadcastOptions()).wait()
        torch.cuda.synchronize(trainer)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    pg.allreduce([torch.zeros(1, device=trainer)]).wait()
    torch.cuda.synchronize(trainer)
    for p in procs:
        p.join(120)
        if p.is_alive():  # a peer stuck in a collective would hold its GPU for the rest of the run
            p.kill()
            p.join(10)
    with contextlib.suppress(Exception):
        pg.shutdown()
    del buf
    torch.cuda.empty_cache()
    med = statistics.median(times)
    return {"bytes": nbytes, "seconds": med, "gbps": nbytes / med / 1e9, "reps": reps}


def copy_ceiling(nbytes: int, device: torch.device, reps: int) -> dict[str, Any]:
    """Median seconds of one contiguous device-to-device copy of ``nbytes`` on ``device`` (the one-GPU ceiling)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    del src, dst
    torch.cuda.empty_cache()
    med = statistics.median(times)
    return {"bytes": nbytes, "seconds": med, "gbps": nbytes / med / 1e9, "reps": reps, "kind": "d2d copy"}


# ---- the engine and the pushes ----------------------------------------------------------------------------


def start_llm(config: Any, gpus: list[str], tp: int, util: float, same_gpu: bool = False) -> Any:
    from vllm import LLM

    from ipcbridge.hf import write_model_dir
    from ipcbridge.vllm.extension import EXTENSION_QUALNAME
    from tests.vllm.vllm_helpers import visible_devices

    model_dir = write_model_dir(config, tempfile.mkdtemp(prefix="ipcbridge-bench-stream-"))
    # One GPU: sleep mode (the engine connect() refuses), no NCCL. Else vLLM's NCCL transfer for its receiver.
    extra: dict[str, Any] = {"enable_sleep_mode": True} if same_gpu else {"weight_transfer_config": {"backend": "nccl"}}
    with visible_devices(",".join(gpus)):
        return LLM(model=model_dir, load_format="dummy", enforce_eager=True, skip_tokenizer_init=True,
                   attention_backend="TRITON_ATTN", gpu_memory_utilization=util, max_model_len=1024, seed=0,
                   dtype="bfloat16", tensor_parallel_size=tp, num_gpu_blocks_override=1024,
                   worker_extension_cls=EXTENSION_QUALNAME, **extra)


def engine_memory(llm: Any, reset: bool) -> list[dict[str, int]]:
    from ipcbridge.vllm.rpc import decode_reply

    replies = llm.collective_rpc("ipcbridge_stream_memory", args=(int(reset),))
    return [decode_reply(r, "ipcbridge_stream_memory") for r in replies]


def trainer_memory(device: torch.device) -> int:
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def greedy_check(llm: Any, sb: Any, sleep_cycle: bool = False) -> dict[str, Any]:
    from vllm import SamplingParams

    from tests.vllm import vllm_helpers as H

    if sleep_cycle:  # a deep sleep discards the weights: the step below must bring them all back
        llm.sleep(level=2)
        llm.wake_up()
    H.decisive_step(sb, PROMPTS, target=42)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False)
    rows = []
    for p in PROMPTS:
        got = [int(t) for t in llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids]
        rows.append({"prompt": p, "vllm": got, "hf": H.hf_greedy(sb.model, p, 8)})
    return {"equal": all(r["vllm"] == r["hf"] for r in rows), "rows": rows}


def run_receiver(llm: Any, model: torch.nn.Module, receiver: str, args: argparse.Namespace) -> dict[str, Any]:
    import ipcbridge

    dev = next(model.parameters()).device
    torch.cuda.reset_peak_memory_stats(dev)
    base = trainer_memory(dev)
    e_base = engine_memory(llm, reset=True)
    bucket = args.bucket_mib * MIB if args.bucket_mib else None
    if args.same_gpu:  # asleep while the stream opens, awake (weights re-mapped) before the first push
        llm.sleep(level=1)
    sb = ipcbridge.stream(llm, model, receiver=receiver, bucket_bytes=bucket, timeout=args.timeout)
    try:
        if args.same_gpu:
            llm.wake_up()
        walls = []
        for i in range(args.pushes + 2):
            t0 = time.perf_counter()
            sb.push()
            if i >= 2:
                walls.append(time.perf_counter() - t0)
        transfer = sb.push_seconds[2:]
        peak_t = torch.cuda.max_memory_allocated(dev) - base
        eng_peak = engine_memory(llm, reset=False)
        t_before, e_before = trainer_memory(dev), engine_memory(llm, reset=False)
        for _ in range(args.flat):
            sb.push()
        t_after, e_after = trainer_memory(dev), engine_memory(llm, reset=False)
        row = {
            "receiver": receiver, "buckets": len(sb.plan.buckets), "buffer_bytes": sb.plan.buffer_bytes,
            "wire_bytes": sb.plan.wire_bytes, "transfer_s": statistics.median(transfer),
            "push_s": statistics.median(walls), "connect_s": sb.connect_seconds,
            # the engine's own receive (first post to last load, no RPC legs); ipcbridge's receivers only
            "receive_s": statistics.median(sb.receive_seconds[2:]) if len(sb.receive_seconds) > 2 else None,
            "trainer_peak_extra": peak_t,
            "engine_peak_extra": [m["peak"] - b["allocated"] for m, b in zip(eng_peak, e_base, strict=True)],
            "flat_pushes": args.flat, "trainer_drift": t_after - t_before,
            "engine_drift": [a["allocated"] - b["allocated"] for a, b in zip(e_after, e_before, strict=True)],
        }
        if args.check:
            row["check"] = greedy_check(llm, sb, sleep_cycle=args.same_gpu)
        return row
    finally:
        sb.close()


def run_shape(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from ipcbridge.stream.plan import plan_vllm_chunks

    config = llama_config(shape)
    trainer = torch.device(f"cuda:{args.trainer_gpu}")
    torch.cuda.set_device(trainer)
    with torch.device(trainer):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out: dict[str, Any] = {"shape": shape, "params_bytes": nbytes, "ceiling": {}, "rows": []}

    def measure_ceiling(wire: int) -> None:
        if wire not in out["ceiling"]:
            out["ceiling"][wire] = (copy_ceiling(wire, trainer, args.reps) if args.same_gpu
                                    else ceiling(wire, args.gpus, trainer, args.reps))

    # Before the engine starts: a running engine's allocator may keep what a stock load cached (an 8B engine
    # at utilisation 0.5 held 133 GiB after vLLM's receiver, 2026-11-30), and the ceiling's peer then OOMs.
    measure_ceiling(plan_vllm_chunks(dict(model.named_parameters()), 1 << 30).wire_bytes)
    llm = start_llm(config, args.gpus, args.tp, args.gpu_memory_utilization, args.same_gpu)
    try:
        for receiver in args.receivers:
            try:
                row = run_receiver(llm, model, receiver, args)
            except Exception as e:  # report and go on: each GPU minute counts
                row = {"receiver": receiver, "error": f"{type(e).__name__}: {e}"}
            if "transfer_s" in row:
                measure_ceiling(row["wire_bytes"])  # every receiver sends the HF bytes once: measured already
                c = out["ceiling"][row["wire_bytes"]]["seconds"]
                row["vs_ceiling_transfer"] = c / row["transfer_s"]
                row["vs_ceiling_push"] = c / row["push_s"]
                if row.get("receive_s"):
                    row["vs_ceiling_receive"] = c / row["receive_s"]
            print(json.dumps({"shape": shape, **row}, default=str), flush=True)
            out["rows"].append(row)
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        del model
        torch.cuda.empty_cache()
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| shape | receiver | wire MB | buckets | ceiling ms (GB/s) | transfer ms | push ms | x ceiling "
             "(transfer / push) | engine receive ms (x ceiling) | trainer peak extra MiB | engine peak extra MiB | "
             "drift after N pushes (B) | greedy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            if "error" in row:
                lines.append(f"| {r['shape']} | {row['receiver']} | error: {row['error'][:120]} |" + " |" * 10)
                continue
            c = r["ceiling"][row["wire_bytes"]]
            receive = (f"{row['receive_s'] * 1e3:.2f} ({row['vs_ceiling_receive']:.3f})" if row.get("receive_s")
                       else "n/a")
            engine_peak = ", ".join(f"{x / MIB:.0f}" for x in row["engine_peak_extra"])
            lines.append(
                f"| {r['shape']} | {row['receiver']} | {row['wire_bytes'] / 1e6:.0f} | {row['buckets']} | "
                f"{c['seconds'] * 1e3:.2f} ({c['gbps']:.0f}) | {row['transfer_s'] * 1e3:.2f} | "
                f"{row['push_s'] * 1e3:.2f} | {row['vs_ceiling_transfer']:.3f} / {row['vs_ceiling_push']:.3f} | "
                f"{receive} | {row['trainer_peak_extra'] / MIB:.0f} | {engine_peak} | "
                f"{row['trainer_drift']} / {row['engine_drift']} ({row['flat_pushes']}) | "
                f"{row.get('check', {}).get('equal', 'n/a')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--receivers", default="vllm,ipcbridge")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--gpus", default="1", help="the engine's GPUs, e.g. 1 or 1,2 (indices as this process sees them, "
                    "like --trainer-gpu: mapped through CUDA_VISIBLE_DEVICES for the engine's processes)")
    ap.add_argument("--trainer-gpu", type=int, default=0)
    ap.add_argument("--pushes", type=int, default=10)
    ap.add_argument("--flat", type=int, default=100, help="pushes between the two memory readings")
    ap.add_argument("--reps", type=int, default=10, help="timed reps of the ceiling broadcast")
    ap.add_argument("--bucket-mib", type=int, default=0, help="0: each receiver's default (ipcbridge: Note [bucket policy]; vLLM: its 1 GiB)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="the engine's share of its GPU (default 0.5; 0.3 with --same-gpu, beside the trainer)")
    ap.add_argument("--same-gpu", action="store_true",
                    help="engine on the trainer's GPU in sleep mode, fed through the shared buffer (receiver ipc)")
    ap.add_argument("--check", action="store_true", help="a decisive step, then vLLM greedy == HF greedy")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    args.receivers = [r.strip() for r in args.receivers.split(",") if r.strip()]
    if args.same_gpu:
        if args.tp != 1:
            raise SystemExit("--same-gpu runs one engine worker (--tp 1) on the trainer's GPU")
        # This process's CUDA_VISIBLE_DEVICES (if any) maps the trainer's index to what the child must see.
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        args.gpus = [visible[args.trainer_gpu] if visible else str(args.trainer_gpu)]
        args.receivers = ["ipc"]
    else:  # the children get CUDA_VISIBLE_DEVICES, which names GPUs as the host does, not as this process does
        from tests.vllm.vllm_helpers import physical_gpus

        args.gpus = physical_gpus(",".join(args.gpus)).split(",")
    if args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = 0.3 if args.same_gpu else 0.5
    if len(args.gpus) != args.tp:
        raise SystemExit(f"--gpus names {len(args.gpus)} GPU(s) for --tp {args.tp}")
    if args.tiny:
        args.models, args.pushes, args.flat, args.reps = "tiny", 3, 5, 3
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.init()
    torch.zeros(1, device=f"cuda:{args.trainer_gpu}")  # CUDA up on every GPU before vLLM's children spawn
    results: list[dict[str, Any]] = []
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "argv": sys.argv,
              "device": torch.cuda.get_device_name(args.trainer_gpu), "gpus": args.gpus, "tp": args.tp,
              "same_gpu": args.same_gpu, "torch": torch.__version__, "results": results}
    with contextlib.suppress(Exception):
        import vllm

        report["vllm"] = vllm.__version__
    for shape in [s.strip() for s in args.models.split(",") if s.strip()]:
        results.append(run_shape(shape, args))
        if args.json:  # after every shape: a later hang or kill keeps what was measured
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1, default=str)
        print(table(results[-1:]), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
