"""The ``vllm serve`` endpoint (``ipcbridge.vllm.http``) against a local fake server on 127.0.0.1."""

from __future__ import annotations

import re
import socket
import time

import pytest

import ipcbridge
from ipcbridge.errors import BridgeError, FenceError, MappingError
from ipcbridge.fence import Lease
from ipcbridge.vllm.http import HttpEndpoint, normalise_url
from tests.vllm import vllm_fakes as F


def lease(seconds: float = 30) -> Lease:
    return Lease.new("test bridge", seconds)


def test_http_connect_and_fence_order(worker: F.FakeWorker) -> None:
    with F.FakeServe(worker) as srv:
        bridge = ipcbridge.connect(srv.url)
        assert bridge.endpoint.name == "vllm-http"
        srv.calls.clear()
        with bridge.update():
            pass
        assert srv.calls == ["/pause?mode=wait", "/reset_prefix_cache", "/collective_rpc", "/resume"]
        assert bridge.weight_version == bridge.endpoint.engine_weight_version() == 1
        bridge.close()


def test_http_server_down() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again on exit: nobody listens there
    with pytest.raises(BridgeError, match="cannot reach vllm serve"):
        HttpEndpoint(f"http://127.0.0.1:{port}", timeout=2).manifest()


def test_http_404_without_dev_mode(worker: F.FakeWorker) -> None:
    with F.FakeServe(worker, dev_mode=False) as srv:
        ep = HttpEndpoint(srv.url, timeout=5)
        for call in (ep.manifest, ep.engine_pause, ep.engine_resume, lambda: ep.pause(lease(), 1)):
            with pytest.raises(BridgeError, match="VLLM_SERVER_DEV_MODE=1"):
                call()
        # The failed pause took no lasting lease: asking again fails the same way, not as "already paused".
        with pytest.raises(BridgeError, match="VLLM_SERVER_DEV_MODE=1") as e:
            ep.pause(lease(), 1)
        assert not isinstance(e.value, FenceError)


def test_http_bad_json(worker: F.FakeWorker) -> None:
    with F.FakeServe(worker) as srv:
        srv.mode = "bad_json"
        with pytest.raises(BridgeError, match="not JSON"):
            HttpEndpoint(srv.url, timeout=5).manifest()


def test_http_timeout(worker: F.FakeWorker) -> None:
    with F.FakeServe(worker) as srv:
        srv.mode = "slow"
        ep = HttpEndpoint(srv.url, timeout=0.2, pause_timeout=0.2)
        with pytest.raises(BridgeError, match="timed out"):
            ep.engine_pause()
        with pytest.raises(BridgeError, match="timed out"):
            ep.pause(lease(), 1)
        assert srv.calls[-1] == "/resume"  # a pause that may have happened is resumed


def test_http_rpc_failures(worker: F.FakeWorker) -> None:
    with F.FakeServe(worker) as srv:
        ep = HttpEndpoint(srv.url, timeout=5)
        srv.mode = "rpc_500"
        with pytest.raises(BridgeError, match=re.escape("--worker-extension-cls ipcbridge.vllm.WorkerExtension")):
            ep.manifest()
        srv.mode = "not_reply"
        with pytest.raises(BridgeError, match="not an ipcbridge reply"):
            ep.manifest()
        with pytest.raises(BridgeError, match=re.escape(f"vllm serve at {ep.url}")):
            ep.manifest()
        srv.mode = "two_workers"
        with pytest.raises(BridgeError, match="2 workers"):
            ep.manifest()


def test_http_worker_error_keeps_its_type(worker: F.FakeWorker) -> None:
    with F.FakeServe(worker) as srv:
        worker.model_error = MappingError("no table for this model")
        with pytest.raises(MappingError, match="no table"):
            HttpEndpoint(srv.url, timeout=5).manifest()


@pytest.mark.parametrize("mode", ["not_reply", "reset_500"])
def test_http_resume_even_if_bookkeeping_fails(worker: F.FakeWorker, mode: str) -> None:
    with F.FakeServe(worker) as srv:
        ep = HttpEndpoint(srv.url, timeout=5)
        srv.mode = mode
        with pytest.raises(BridgeError):
            ep.engine_resume()
        assert srv.calls[-1] == "/resume"  # the server is never left paused
        srv.calls.clear()
        srv.mode = "ok"
        held = lease()
        ep.pause(held, 1)
        srv.mode = mode
        with pytest.raises(BridgeError):
            ep.resume(held)
        assert srv.calls[0] == "/pause?mode=wait" and srv.calls[-1] == "/resume"
        srv.mode = "ok"
        ep.pause(lease(), 1)  # the lease ended with the failed resume


def test_http_versions_from_the_worker(worker: F.FakeWorker) -> None:
    with F.FakeServe(worker) as srv:
        a, b = HttpEndpoint(srv.url, timeout=5), HttpEndpoint(srv.url + "/", timeout=5)
        fa, fb = F.fence_for(a, "bridge a"), F.fence_for(b, "bridge b")
        versions = []
        for fence in (fa, fb, fa):
            with fence.hold():
                pass
            versions.append(fence.version)
        assert versions == [1, 2, 3] and b.engine_weight_version() == 3


def test_http_one_gate_per_server(worker: F.FakeWorker) -> None:
    with F.FakeServe(worker) as srv:
        port = srv.url.rsplit(":", 1)[1]
        a = HttpEndpoint(srv.url, timeout=5)
        b = HttpEndpoint(f"HTTP://127.0.0.1:{port}/", timeout=5)
        assert a.gate_key == b.gate_key == a.url
        held = lease()
        a.pause(held, 1)
        t0 = time.monotonic()
        with pytest.raises(FenceError, match="this very thread"):
            b.pause(lease(), 10)
        assert time.monotonic() - t0 < 1
        assert a.resume(held) == 1


def test_normalise_url() -> None:
    assert normalise_url("http://Example.COM") == "http://example.com:80"
    assert normalise_url("https://h/") == "https://h:443"
    assert normalise_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert normalise_url("http://h:8000/prefix/") == "http://h:8000/prefix"
    assert normalise_url("http://[::1]:8000") == "http://[::1]:8000"
    for bad in ("localhost:8000", "ftp://h", "http://", "http://h:notaport"):
        with pytest.raises(BridgeError, match="http"):
            normalise_url(bad)


def test_http_rejects_non_http_url() -> None:
    with pytest.raises(BridgeError, match="http"):
        HttpEndpoint("localhost:8000")
