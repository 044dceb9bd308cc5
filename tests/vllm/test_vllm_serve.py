"""Real ``vllm serve`` (VLLM_SERVER_DEV_MODE=1, --worker-extension-cls) started in the background; the trainer
attaches over HTTP and updates the weights while greedy requests are in flight.

Every response must be the HF model's greedy continuation under the old or under the new weights, never a
mix; requests sent while the server is paused must get the new weights; the server's weight version must
equal ``bridge.weight_version``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import ipcbridge
from tests.vllm import vllm_helpers as H

pytestmark = pytest.mark.vllm

PROMPTS = [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11, 12], [300, 301, 302, 303, 304]]
N_TOKENS = 64
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    H.require_vllm()
    from ipcbridge.hf import write_model_dir
    from ipcbridge.vllm.extension import EXTENSION_QUALNAME
    from ipcbridge.vllm.http import HttpEndpoint

    model_dir = write_model_dir(H.tiny_config("llama"), tempfile.mkdtemp(prefix="ipcbridge-serve-"))
    port = _free_port()
    log_path = os.path.join(os.environ.get("IPCBRIDGE_LOGDIR", tempfile.gettempdir()), "vllm_serve.log")
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # `vllm serve DIR ...` is this module's CLI; the module form needs no console script.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--host", "127.0.0.1", "--port", str(port), "--load-format", "dummy", "--skip-tokenizer-init",
           "--enforce-eager", "--gpu-memory-utilization", "0.25", "--max-model-len", "512", "--seed", "0",
           "--attention-backend", "TRITON_ATTN", "--num-gpu-blocks-override", "4096",
           "--worker-extension-cls", EXTENSION_QUALNAME]
    log = open(log_path, "w")  # noqa: SIM115 - the server writes to it for the whole module
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    ep = HttpEndpoint(url, timeout=5)
    t0 = time.time()
    try:
        while True:
            if proc.poll() is not None:
                log.flush()
                with open(log_path) as f:
                    tail = f.read()[-4000:]
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{tail}")
            try:
                ep.request("GET", "/health")
                break
            except ipcbridge.BridgeError:
                if time.time() - t0 > 300:
                    pytest.fail("vllm serve did not become healthy in 300 s")
                time.sleep(1)
        H.record("serve_started", seconds=round(time.time() - t0, 1), url=url, log=log_path)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):  # a server that failed to start is gone already
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its EngineCore child (own session)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_serve_update_while_requests_in_flight(server: str) -> None:
    from ipcbridge.vllm.http import HttpEndpoint

    bridge = ipcbridge.connect(server, check=True)
    try:
        report = bridge.check()
        assert report.ok and report.trainer_weight_bytes == 0
        with bridge.update():
            H.init_weights(bridge.model, seed=0)
        H.decisive_step(bridge, PROMPTS, 555)  # the "old" weights: confident, so greedy has clear margins
        old_model = H.snapshot(bridge.model)
        old = [H.hf_greedy(bridge.model, p, N_TOKENS) for p in PROMPTS]
        client = HttpEndpoint(server, timeout=120)
        served_old = [client.complete(p, N_TOKENS)[0] for p in PROMPTS]

        pool = ThreadPoolExecutor(16)
        early = [pool.submit(client.complete, p, N_TOKENS) for p in PROMPTS for _ in range(2)]
        time.sleep(0.15)  # let them reach the engine and start decoding
        in_flight_at_pause = sum(not f.done() for f in early)
        late: list = []
        paused_seen: list[bool] = []

        def send_late() -> None:  # inside the fence: the server is paused now
            paused_seen.append(client.is_paused())
            late.extend(pool.submit(client.complete, p, N_TOKENS) for p in PROMPTS)
            time.sleep(0.2)  # make sure they are queued by the paused engine before we resume

        H.decisive_step(bridge, PROMPTS, 888, 2e-2, send_late)
        early_res = [f.result()[0] for f in early]
        late_res = [f.result()[0] for f in late]
        pool.shutdown()
        new = [H.hf_greedy(bridge.model, p, N_TOKENS) for p in PROMPTS]
        engine_version = bridge.endpoint.engine_weight_version()
        models = {"old": old_model, "new": bridge.model}

        def cls(res: list[int], i: int) -> dict:
            return H.classify(res, PROMPTS[i], {"old": old[i], "new": new[i]}, models)

        res = {
            "check_ok": report.ok, "hf_parameters": report.hf_parameters, "engine_tensors": report.engine_tensors,
            "trainer_weight_bytes": report.trainer_weight_bytes, "parity_dummy_mean": report.logprob_mean_abs_diff,
            "served_old_equals_hf": served_old == old, "old_ne_new": old != new,
            "in_flight_at_pause": in_flight_at_pause, "paused_seen": paused_seen,
            "early": [cls(r, i // 2) for i, r in enumerate(early_res)],
            "late": [cls(r, i) for i, r in enumerate(late_res)],
            "old": old, "new": new, "late_tokens": late_res,
            "weight_version": bridge.weight_version, "engine_version": engine_version,
            "fence_ms": [round(1e3 * s, 1) for s in bridge.fence_seconds],
        }
        labels = [c["label"] for c in res["early"] + res["late"]]
        exact = sum(bool(c["exact"]) for c in res["early"] + res["late"])
        H.record("serve_in_flight", **res)
        H.record("serve_summary", labels=labels, exact=f"{exact}/{len(labels)}", in_flight=in_flight_at_pause,
                 versions=[res["weight_version"], engine_version])
        assert res["served_old_equals_hf"]
        assert res["old_ne_new"]
        assert "mix" not in labels
        assert [c["label"] for c in res["late"]] == ["new"] * len(PROMPTS)
        assert paused_seen == [True]
        assert res["weight_version"] == res["engine_version"]
    finally:
        bridge.close()
