"""Where ``attach`` spends its time, phase by phase, for the Llama-3-8B shape (195 vLLM tensors, bf16).

A child process holds the engine's weights in the vLLM layout and exports them with ``ipcbridge.export``
(CPU: /dev/shm; CUDA: CUDA IPC handles), as a vLLM worker or ``LocalEngine`` does; the parent (the trainer)
attaches to the manifest, as ``ipcbridge.connect`` does after its manifest RPC. Each repeat times the
phases of :func:`ipcbridge.attach.attach_with_attachment` by calling the functions it calls, in its order,
then times the whole ``Manifest.from_json`` + ``attach_with_attachment`` path in one go (the two must agree:
the phase sum drifting from the whole means this script no longer follows ``attach``).

CPU weights are sparse: the child makes each storage from a ``/dev/shm`` file it truncates to size (a torch
shared-memory object, named and unlinked the way torch does, so every provenance check runs unchanged) and
nothing ever touches the pages, so the 16 GB of the 8B shape cost no memory.

    python benchmarks/bench_attach.py                          # CPU (shm), 8B shape, table
    python benchmarks/bench_attach.py --profile 30             # also cProfile's top functions
    PYTHONPATH=. python3 benchmarks/bench_attach.py --device cuda --json $OUT/attach.json   # on the GPU

``--tiny`` runs a tiny Llama (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import llama_8b_config

import ipcbridge
import ipcbridge.attach
from ipcbridge import handles, hf
from ipcbridge.manifest import Manifest

#: ``ipcbridge.attach`` is also the name of a function the package exports; the module, by its path.
attach_mod = sys.modules["ipcbridge.attach"]

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("parse", "config", "open", "views", "build", "bind", "buffers", "verify", "close")
EXPLAIN = {
    "parse": "Manifest.from_json: JSON + every field validated",
    "config": "hf.to_hf_config(manifest.config)",
    "open": "open_manifest: provenance checks + map each storage + tensor views",
    "views": "HF views of the vLLM tensors (mapping tables)",
    "build": "hf.build_meta_model: the HF model on meta",
    "bind": "attach.bind: coverage, shapes, one Parameter per view, setattr",
    "buffers": "hf.materialize_buffers: rotary buffers next to the weights",
    "verify": "attach.verify: nothing on meta, dtypes, zero-copy ranges",
    "close": "unmapping (not part of attach)",
}


def vllm_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """vLLM's tensor names and shapes for ``config``: the HF model on meta, through ``to_vllm`` (no memory)."""
    from ipcbridge.mapping import to_vllm

    model = hf.build_meta_model(config, torch.bfloat16)
    return {n: tuple(t.shape) for n, t in to_vllm(dict(model.state_dict()), config).items()}


# ---- the producer (child process) ----------------------------------------------------------------------


def sparse_shm_storage(nbytes: int, n: int) -> torch.UntypedStorage:
    """A /dev/shm storage whose pages are never allocated. torch's ``_new_shared`` would ``fallocate`` them
    (16 GB for the 8B shape); a file truncated to size and mapped through ``_new_shared_fd_cpu`` costs nothing
    until written. Named like torch's own objects and unlinked at once, so the consumer's checks pass."""
    path = f"/dev/shm/torch_{os.getpid()}_{time.monotonic_ns() % 10**9}_{n}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.unlink(path)
        os.ftruncate(fd, max(nbytes, 1))
        return torch.UntypedStorage._new_shared_fd_cpu(fd, max(nbytes, 1))  # torch keeps its own dup
    finally:
        os.close(fd)


def produce(device: str, tiny: bool, out: str) -> None:
    """Hold the weights, write their manifest to ``out``, say READY, and keep them until stdin closes."""
    config = llama_8b_config(tiny)
    tensors: dict[str, torch.Tensor] = {}
    for i, (name, shape) in enumerate(vllm_shapes(config).items()):
        if device == "cuda":
            tensors[name] = torch.empty(shape, dtype=torch.bfloat16, device="cuda")  # one allocation each, as vLLM
        else:
            st = sparse_shm_storage(2 * torch.Size(shape).numel(), i)
            tensors[name] = torch.empty(0, dtype=torch.bfloat16).set_(st, 0, shape)
    if device == "cuda":
        torch.cuda.synchronize()
    manifest = ipcbridge.export(tensors, config, layout="vllm")
    Path(out).write_text(manifest.to_json())
    print("READY", flush=True)
    sys.stdin.read()


def start_producer(device: str, tiny: bool, out: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--device", device, "--manifest", str(out)]
    child = subprocess.Popen(cmd + (["--tiny"] if tiny else []), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=env)
    line = child.stdout.readline() if child.stdout else ""
    if line.strip() != "READY":
        child.kill()
        raise SystemExit(f"the producer did not start (said {line!r}, exit {child.wait()})")
    return child


# ---- the consumer: one attach, phase by phase ---------------------------------------------------------


def phases_once(text: str) -> dict[str, float]:
    """One attach, timing each step of ``attach_with_attachment`` (same functions, same order)."""
    times = _phases(text)
    gc.collect()  # the model is gone: every run maps afresh (torch reuses a CUDA IPC mapping while it lives)
    return times


def _phases(text: str) -> dict[str, float]:
    times: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        result = fn()
        times[name] = time.perf_counter() - t0
        return result

    manifest = timed("parse", lambda: Manifest.from_json(text))
    hf_config = timed("config", lambda: hf.to_hf_config(manifest.config))
    opened = timed("open", lambda: handles.open_manifest(manifest))
    views = timed("views", lambda: attach_mod._views(opened.tensors, hf_config, manifest.layout,
                                                     manifest.loader_plan))
    dtype = next(iter(views.values())).dtype
    model = timed("build", lambda: hf.build_meta_model(hf_config, dtype))
    timed("bind", lambda: attach_mod.bind(model, views))
    timed("buffers", lambda: hf.materialize_buffers(model, next(iter(views.values())).device))
    attachment = attach_mod.Attachment(layout=manifest.layout, ranges=opened.ranges(),
                                       source_tensors=opened.tensors, opened=opened)
    timed("verify", lambda: attach_mod.verify(model, attachment, views))
    model.eval()
    timed("close", attachment.close)
    return times


def whole_once(text: str, prof: Any = None) -> float:
    """``Manifest.from_json`` + ``attach_with_attachment``: what ``connect`` does after its manifest RPC
    (under ``prof``, a ``cProfile.Profile``, if given)."""
    if prof is not None:
        prof.enable()
    t0 = time.perf_counter()
    model, attachment = attach_mod.attach_with_attachment(Manifest.from_json(text))
    elapsed = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
    del model
    attachment.close()
    gc.collect()  # every run maps afresh: torch reuses a CUDA IPC mapping while any view of it lives
    return elapsed


def connect_once(text: str) -> float:
    """``ipcbridge.connect`` of the parsed manifest: the attach plus the Bridge (fence, step guard)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-per-process PrecisionWarning
        t0 = time.perf_counter()
        bridge = ipcbridge.connect(Manifest.from_json(text))
        elapsed = time.perf_counter() - t0
    bridge.close()
    gc.collect()
    return elapsed


def import_modeling(text: str) -> None:
    """Import what a trainer has imported anyway (transformers' causal-LM classes and this architecture's
    modeling module), so that the first attach measures attach, not ``import``."""
    from transformers import AutoModelForCausalLM

    config = hf.to_hf_config(Manifest.from_json(text).config)
    AutoModelForCausalLM._model_mapping[type(config)]  # the lookup imports modeling_<arch>


def profile_once(text: str, top: int) -> dict[str, list[dict[str, Any]]]:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    whole_once(text, prof)
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]

    def rows(key: int) -> list[dict[str, Any]]:
        ordered = sorted(stats.items(), key=lambda kv: kv[1][key], reverse=True)[:top]
        return [{"function": f"{fn[0].rsplit('/', 2)[-1]}:{fn[1]}({fn[2]})", "calls": v[1],
                 "tottime_s": round(v[2], 4), "cumulative_s": round(v[3], 4)} for fn, v in ordered]

    return {"cumulative": rows(3), "own": rows(2)}


def measure(text: str, repeats: int, top: int) -> dict[str, Any]:
    import_modeling(text)
    first_whole = whole_once(text)  # the first attach of the process: first mappings, first caches
    runs = [phases_once(text) for _ in range(repeats)]
    wholes = [whole_once(text) for _ in range(repeats)]
    connects = [connect_once(text) for _ in range(repeats)]
    medians = {p: statistics.median(r[p] for r in runs) for p in PHASES}
    res: dict[str, Any] = {
        "first_attach_s": first_whole,
        "attach_median_s": statistics.median(wholes),
        "attach_all_s": wholes,
        "connect_median_s": statistics.median(connects),
        "phase_median_s": medians,
        "phase_sum_s": sum(v for p, v in medians.items() if p != "close"),
    }
    if Manifest.from_json(text).transport == "cuda_ipc":
        res.update(cuda_experiments(text, repeats))
    if top:
        res["profile_top"] = profile_once(text, top)
    return res


def cuda_experiments(text: str, repeats: int) -> dict[str, float]:
    """Where a CUDA attach's opening goes, by taking parts away (timings only; nothing here is what attach does):

    * ``attach_while_mapped``: attach again while one attachment holds every segment, so torch's mapping
      cache answers instead of ``cudaIpcOpenMemHandle``: the difference to ``attach`` is the mapping's cost;
    * ``attach_no_event``: the manifest rewritten with ``event_sync_required=false``, so torch opens no IPC
      event per storage (safe here only because the producer synchronised before exporting): the
      difference is what the per-storage event costs.
    """
    model, attachment = attach_mod.attach_with_attachment(Manifest.from_json(text))
    while_mapped = [whole_once(text) for _ in range(repeats)]
    del model
    attachment.close()
    gc.collect()
    d = json.loads(text)
    for s in d["storages"]:
        if s["kind"] == "cuda_ipc":
            s["event_sync_required"] = False
    no_event = json.dumps(d)
    return {"attach_while_mapped_median_s": statistics.median(while_mapped),
            "attach_no_event_median_s": statistics.median(whole_once(no_event) for _ in range(repeats))}


def storage_facts(manifest: Manifest) -> dict[str, int]:
    """What opening costs scale with on CUDA: one ``cudaIpcOpenMemHandle`` per distinct memory handle
    (torch caches a segment's mapping), one ref-counter file check per file (Note [one check per
    ref-counter file]), one IPC event per storage that asks for a sync."""
    cuda = [s for s in manifest.storages if s.kind == "cuda_ipc"]
    if not cuda:
        return {}
    return {"cuda_segments": len({s.handle for s in cuda}), "ref_counter_files": len({s.ref_counter_handle for s in cuda}),
            "event_syncs": sum(s.event_sync_required for s in cuda)}


# ---- report -----------------------------------------------------------------------------------------------


def table(res: dict[str, Any]) -> str:
    out = [f"{res['date']}, {res['device']}, torch {res['torch']}, transformers {res['transformers']}; "
           f"{res['shape']}, {res['tensors']} tensors in {res['storages']} storages, manifest {res['manifest_bytes']} B"
           + "".join(f", {k} {res[k]}" for k in ("cuda_segments", "ref_counter_files", "event_syncs") if k in res),
           "", "| phase | median ms | what |", "| --- | ---: | --- |"]
    for p in PHASES:
        out.append(f"| {p} | {1e3 * res['phase_median_s'][p]:.2f} | {EXPLAIN[p]} |")
    out.append(f"| **sum (attach)** | **{1e3 * res['phase_sum_s']:.2f}** | phases without close |")
    out.append(f"| whole attach, median of {len(res['attach_all_s'])} | {1e3 * res['attach_median_s']:.2f} | "
               "Manifest.from_json + attach_with_attachment |")
    out.append(f"| whole attach, first call | {1e3 * res['first_attach_s']:.2f} | the process's first attach "
               "(transformers' modeling imported before, as in a trainer) |")
    out.append(f"| connect(manifest), median | {1e3 * res['connect_median_s']:.2f} | parse + attach + Bridge "
               "(fence, step guard); no engine RPC |")
    for key, what in (("attach_while_mapped_median_s", "segments already mapped (no cudaIpcOpenMemHandle)"),
                      ("attach_no_event_median_s", "event_sync_required=false (no IPC event per storage)")):
        if key in res:
            out.append(f"| experiment: attach, {what} | {1e3 * res[key]:.2f} | not what attach does |")
    for kind, rows in res.get("profile_top", {}).items():
        out.append(f"cProfile, one attach, top by {kind} time:")
        out += [f"    {r['cumulative_s']:8.4f} s cum {r['tottime_s']:8.4f} s own {r['calls']:>7} calls  "
                f"{r['function']}" for r in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama instead of the 8B shape")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile one attach: the top N functions")
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return produce(args.device, args.tiny, args.manifest)
    import transformers

    if args.device == "cuda":
        torch.cuda.init()
        torch.empty(1, device="cuda")  # the trainer's CUDA context exists before connect, as in bench_vllm
    path = Path(args.json or "/tmp/bench_attach").with_suffix(".manifest.json")
    child = start_producer(args.device, args.tiny, path)
    try:
        text = path.read_text()
        manifest = Manifest.from_json(text)
        res: dict[str, Any] = {
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "transformers": transformers.__version__, "shape": "tiny llama" if args.tiny else "Llama-3-8B (bf16)",
            "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "transport": manifest.transport, "tensors": len(manifest.tensors),
            "storages": len(manifest.storages), "manifest_bytes": len(text), **storage_facts(manifest),
        }
        res.update(measure(text, args.repeats, args.profile))
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait(timeout=60)
        path.unlink(missing_ok=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    print(table(res))


if __name__ == "__main__":
    main()
