"""Shared pieces of the vllm-marked tests: tiny configs, weight init through the bridge, HF greedy decoding,
logprob parity, the decisive training step, ``vllm serve`` in the background, and a results log
(``$IPCBRIDGE_RESULTS``, one JSON object per line).

Not a test module. Imported as ``tests.vllm.vllm_helpers``: ``tests`` is a package, so this folder is
``tests.vllm`` and never shadows the real ``vllm`` package (only the repository root is on sys.path).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from ipcbridge.errors import BridgeError
from ipcbridge.logprobs import greedy, sequence_logprobs
from ipcbridge.vllm.testing import init_weights_
from tests import helpers

ARCHS = ("llama", "qwen2", "qwen3")
PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11, 12], [300, 301, 302, 303, 304]]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def require_vllm() -> None:
    # A deep module, not "vllm": a folder named tests/vllm could pass as a namespace package "vllm".
    pytest.importorskip("vllm.entrypoints.llm", reason="needs vllm>=0.25.1,<0.34 and a GPU (GPU machine)")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    # vLLM forks its engine process unless CUDA is initialized here; a test run that starts with these
    # tests initializes CUDA only later, inside the forked child, which then cannot use it.
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"


def tiny_config(arch: str, **overrides: Any) -> Any:
    """The shared tiny config at a size vLLM's Triton attention takes (head_dim 64); vocab 1000 is padded
    to 1024 by vLLM. qwen2 ties embeddings and has q/k/v biases, qwen3 has q_norm/k_norm. ``overrides``
    change fields (a model that does not fit the engine's, say)."""
    fields: dict[str, Any] = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, head_dim=64,
                                  max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    return helpers.tiny_config(arch, tied=arch == "qwen2", **{**fields, **overrides})


def record(test: str, **data: Any) -> None:
    """Append one result line to $IPCBRIDGE_RESULTS (and print it: pytest -s shows it)."""
    line = json.dumps({"test": test, "time": time.strftime("%H:%M:%S"), **data}, default=str)
    print("RESULT", line, flush=True)
    path = os.environ.get("IPCBRIDGE_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def init_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """The worker's HF-style init, written *through the attached views* (so into vLLM's memory)."""
    init_weights_(model, seed, std)


hf_greedy = greedy  # the HF model's greedy continuation (full recompute per token, cache-free)


def parity(model: torch.nn.Module, outs: list, prompts: list[list[int]] = PROMPTS) -> dict[str, Any]:
    """Mean and max |logprob_HF - logprob_vLLM| over every token vLLM generated (``outs[i]`` from ``prompts[i]``)."""
    diffs: list[float] = []
    for prompt, out in zip(prompts, outs, strict=True):
        hf = sequence_logprobs(model, prompt, out.token_ids)
        diffs += [abs(a - b) for a, b in zip(hf, out.logprobs, strict=True)]
    return {"mean_abs_diff": statistics.fmean(diffs), "max_abs_diff": max(diffs), "tokens": len(diffs)}


@torch.no_grad()
def top1_agreement(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> dict[str, Any]:
    """Teacher-forced on ``tokens``: how often they are the HF model's argmax, and the largest logprob gap
    by which the HF model preferred another token (0 where it agrees)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + tokens], device=device)
    lp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1: -1].float(), -1)
    chosen = lp.gather(1, torch.tensor(tokens, device=device)[:, None])[:, 0]
    gap = lp.max(-1).values - chosen
    return {"agree": int((gap == 0).sum()), "of": len(tokens), "max_gap": float(gap.max())}


def decisive_step(bridge: Any, prompts: list[list[int]], target: int, lr: float = 1e-2,
                  inside: Callable[[], None] | None = None) -> None:
    """One Adam step (a sign step of size ``lr`` for every weight) toward emitting ``target`` after each
    prompt, fenced with ``bridge.update()``. The gradient is computed before the fence (reading the weights
    while the engine generates is harmless); only the step itself runs inside it, after ``inside()`` (which
    tests use to send requests while the engine is paused)."""
    model = bridge.model
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    opt.zero_grad(set_to_none=True)
    loss = torch.zeros((), device=device)
    for p in prompts:
        seq = p + [target] * 8
        logits = model(torch.tensor([seq], device=device)).logits[0, len(p) - 1: -1].float()
        loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor([target] * 8, device=device))
    loss.backward()
    with bridge.update():
        if inside is not None:
            inside()
        opt.step()
    opt.zero_grad(set_to_none=True)
    del opt


def snapshot(model: torch.nn.Module) -> torch.nn.Module:
    """An independent HF model holding a copy of ``model``'s current weights (trainer memory; tiny models)."""
    from transformers import AutoModelForCausalLM

    p = next(model.parameters())
    with torch.device(p.device):
        copy = AutoModelForCausalLM.from_config(model.config, dtype=p.dtype)
    copy.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    return copy.eval()


def classify(tokens: list[int], prompt: list[int], greedy: dict[str, list[int]],
             models: dict[str, torch.nn.Module], tol: float = 0.03) -> dict[str, Any]:
    """Which weight version produced ``tokens``: ``exact`` names the versions whose HF greedy continuation it
    equals; ``consistent`` those under which every token is the HF argmax or within ``tol`` nats of it
    (a bf16 near-tie, which HF and vLLM may break differently). ``label`` is "mix" if neither."""
    exact = [v for v, g in greedy.items() if g == tokens]
    gaps = {v: top1_agreement(m, prompt, tokens)["max_gap"] for v, m in models.items()}
    consistent = [v for v, gap in gaps.items() if gap <= tol]
    label = exact[0] if len(exact) == 1 else consistent[0] if len(consistent) == 1 else \
        "+".join(exact or consistent) or "mix"
    return {"label": label, "exact": exact, "max_gap": {v: round(g, 4) for v, g in gaps.items()}}


def cuda_allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def physical_gpus(indices: str) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a child that must see this process's GPUs ``indices`` (``"1"``, ``"1,2"``:
    indices as ``torch.cuda`` numbers them here). Where this process runs under ``CUDA_VISIBLE_DEVICES`` (a
    shared host handing out e.g. ``"4,5"`` or GPU UUIDs), its index 1 is the list's second entry, not
    physical GPU 1, which the child might not be allowed to see, or which might be another job's."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        return indices
    out = []
    for i in (x.strip() for x in indices.split(",") if x.strip()):
        if not i.isdigit() or int(i) >= len(visible):
            raise ValueError(f"GPU index {i!r} is not among this process's CUDA_VISIBLE_DEVICES={visible}")
        out.append(visible[int(i)])
    return ",".join(out)


@contextlib.contextmanager
def visible_devices(value: str) -> Iterator[None]:
    """``CUDA_VISIBLE_DEVICES=value`` for the processes started inside the block (this process's CUDA, once
    initialised, keeps the devices it saw)."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


@contextlib.contextmanager
def vllm_serve(what: str, *args: str, gpu_memory_utilization: float, log: str,
               env: dict[str, str] | None = None) -> Iterator[str]:
    """``vllm serve`` (dev mode, ipcbridge's extension) of the tiny llama in the background, until healthy:
    yields its URL, then stops it with its EngineCore. ``args``: more server flags; ``env``: more variables;
    ``log``: its log's file name in ``$IPCBRIDGE_LOGDIR``."""
    from ipcbridge.hf import write_model_dir
    from ipcbridge.stream.nccl import free_port
    from ipcbridge.vllm.extension import EXTENSION_QUALNAME

    model_dir = write_model_dir(tiny_config("llama"), tempfile.mkdtemp(prefix=f"ipcbridge-{what}-"))
    port = free_port("127.0.0.1")
    log_path = os.path.join(os.environ.get("IPCBRIDGE_LOGDIR", tempfile.gettempdir()), log)
    full_env = dict(os.environ, VLLM_SERVER_DEV_MODE="1",
                    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    # `vllm serve DIR ...` is this module's CLI; the module form needs no console script.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--host", "127.0.0.1", "--port", str(port), "--load-format", "dummy", "--skip-tokenizer-init",
           "--enforce-eager", "--gpu-memory-utilization", str(gpu_memory_utilization), "--max-model-len", "512",
           "--seed", "0", "--attention-backend", "TRITON_ATTN", "--num-gpu-blocks-override", "4096",
           "--worker-extension-cls", EXTENSION_QUALNAME, *args]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            t0 = time.time()
            _wait_healthy(proc, url, log_path)
            record(f"{what}_started", seconds=round(time.time() - t0, 1), url=url, log=log_path)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):  # a server that failed to start is gone already
                os.killpg(proc.pid, signal.SIGTERM)  # the server and its EngineCore child (own session)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
            with contextlib.suppress(ProcessLookupError):  # the EngineCore may outlive its server's SIGTERM
                os.killpg(proc.pid, signal.SIGKILL)


def _wait_healthy(proc: subprocess.Popen, url: str, log_path: str, limit: float = 300.0) -> None:
    from ipcbridge.vllm.http import HttpEndpoint

    ep = HttpEndpoint(url, timeout=5)
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            with open(log_path) as f:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{f.read()[-4000:]}")
        try:
            ep.request("GET", "/health")
            return
        except BridgeError:
            if time.time() - t0 > limit:
                pytest.fail(f"vllm serve did not become healthy in {limit:.0f} s")
            time.sleep(1)
