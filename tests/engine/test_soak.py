"""Soak checks of the embedded engine (slow-marked: ~30 s together on 2 CPU cores).

* Leaks: 1000 attach/close cycles of real mappings (every tenth through the control socket, the rest from
  the manifest itself, which is the same attach path without the RPC) leave this process's descriptors,
  mappings, RSS and /dev/shm where they were.
* Torn reads: threads generate while another thread runs fenced updates that write a version-dependent
  set of weights slowly, parameter by parameter; every generation must match exactly the weights of the
  version it reports.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import pytest
import torch

import ipcbridge
from ipcbridge.engine.types import GenerateOutput
from ipcbridge.logprobs import greedy, sequence_logprobs
from tests.helpers import tiny_config

pytestmark = pytest.mark.slow

PROMPT = [3, 14, 15, 92]


@pytest.fixture(scope="module")
def engine():
    with ipcbridge.LocalEngine(tiny_config("llama"), device="cpu", seed=3) as eng:
        yield eng


def _footprint(engine_pid: int) -> dict[str, int]:
    gc.collect()
    maps = Path("/proc/self/maps").read_text().splitlines()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    ours = (f"torch_{os.getpid()}_", f"torch_{engine_pid}_")
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "maps": len(maps),
        "engine_maps": sum(f"/dev/shm/torch_{engine_pid}_" in line for line in maps),
        "rss_kib": int(status["VmRSS"].split()[0]),
        "dev_shm": sum(name.startswith(ours) for name in os.listdir("/dev/shm")),
    }


def test_1000_attach_close_cycles_leave_no_trace(engine) -> None:
    manifest = engine.manifest()
    for _ in range(20):  # warm up: imports, allocator pools, the first HF model's caches
        ipcbridge.connect(manifest).close()
    before = _footprint(engine.pid)
    for i in range(1000):
        bridge = ipcbridge.connect(engine if i % 10 == 0 else manifest)
        assert bridge.model.lm_head.weight.data_ptr() != 0
        bridge.close()
    after = _footprint(engine.pid)
    assert after["fds"] == before["fds"]
    assert after["engine_maps"] == before["engine_maps"] == 0
    assert after["dev_shm"] == before["dev_shm"]
    assert after["maps"] - before["maps"] <= 8, (before, after)  # malloc arenas may come and go
    assert after["rss_kib"] - before["rss_kib"] < 32 * 1024, (before, after)


def _write_slowly(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)
            time.sleep(0.002)  # a generation slipping in now would see some tensors old, some new


def test_no_generation_mixes_weight_versions(engine) -> None:
    bridge = ipcbridge.connect(engine)
    params = [p for _, p in sorted(bridge.model.named_parameters())]
    torch.manual_seed(0)
    sets = [[p.detach() + torch.randn_like(p) * 0.3 for p in params] for _ in range(3)]
    expected: dict[int, tuple[list[int], list[float]]] = {}
    version_set: dict[int, int] = {}
    for k, values in enumerate(sets):
        with bridge.update():
            _write_slowly(params, values)
        version_set[bridge.weight_version] = k
        tokens = greedy(bridge.model, PROMPT, 8)
        expected[k] = (tokens, sequence_logprobs(bridge.model, PROMPT, tokens))
    assert len({tuple(t) for t, _ in expected.values()}) > 1  # the sets are told apart by their tokens alone

    outputs: list[GenerateOutput] = []
    stop = threading.Event()

    def generate() -> None:
        while not stop.is_set():
            outputs.extend(engine.generate([PROMPT], max_tokens=8))

    threads = [threading.Thread(target=generate) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(80):
            with bridge.update():
                _write_slowly(params, sets[i % 3])
            version_set[bridge.weight_version] = i % 3
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    bridge.close()

    assert len(outputs) >= 40, len(outputs)
    torn = []
    for out in outputs:
        tokens, logprobs = expected[version_set[out.weight_version]]
        if out.token_ids != tokens or max(abs(a - b) for a, b in zip(out.logprobs, logprobs, strict=True)) > 1e-4:
            torn.append(out)
    assert torn == [], f"{len(torn)} of {len(outputs)} generations mixed weight versions"
