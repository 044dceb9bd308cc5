"""Real ``vllm serve`` (VLLM_SERVER_DEV_MODE=1, --worker-extension-cls) started in the background; the trainer
attaches over HTTP and updates the weights while greedy requests are in flight.

Every response must be the HF model's greedy continuation under the old or under the new weights, never a
mix; requests sent while the server is paused must get the new weights; the server's weight version must
equal ``bridge.weight_version``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

import ipcbridge
from tests.vllm import vllm_helpers as H

pytestmark = pytest.mark.vllm

PROMPTS = H.PROMPTS
N_TOKENS = 64


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    H.require_vllm()
    with H.vllm_serve("serve", gpu_memory_utilization=0.25, log="vllm_serve.log") as url:
        yield url


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
