"""The ``vllm serve`` endpoint (``ipcbridge.vllm.http``) against a local fake server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import ipcbridge
from ipcbridge.errors import BridgeError, FenceError, MappingError
from ipcbridge.fence import Lease
from ipcbridge.vllm.http import MAX_BODY_BYTES, HttpEndpoint, normalise_url
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
        assert srv.calls == ["/pause?mode=wait&clear_cache=false", "/reset_prefix_cache", "/collective_rpc", "/resume"]
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
        assert srv.calls[0] == "/pause?mode=wait&clear_cache=false" and srv.calls[-1] == "/resume"
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


# ---- a hostile server (issue 9, item 5): redirects, trickles, floods, deep JSON -----------------------------


class Hostile:
    """An HTTP server on 127.0.0.1 whose every answer is ``behave(handler)``; ``hits`` lists the paths asked."""

    def __init__(self, behave) -> None:
        self.behave = behave
        self.hits: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                outer.hits.append(self.path)
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                with contextlib.suppress(OSError):
                    outer.behave(self)

            do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Hostile:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def answer(handler, body: bytes, status: int = 200, **headers: str) -> None:
    handler.send_response(status)
    for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
        handler.send_header(k.replace("_", "-"), v)
    handler.end_headers()
    handler.wfile.write(body)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_no_redirect_is_followed_to_another_origin(status: int) -> None:
    with Hostile(lambda h: answer(h, b'{"results": []}')) as elsewhere, \
            Hostile(lambda h: answer(h, b"", status, Location=elsewhere.url + h.path)) as srv:
        with pytest.raises(BridgeError) as e:
            HttpEndpoint(srv.url, timeout=5).manifest()
        message = str(e.value)
        assert f"redirected (HTTP {status}) to {elsewhere.url}/collective_rpc" in message
        assert f"ipcbridge.connect({elsewhere.url!r})" in message  # the final URL to pass instead
        with pytest.raises(BridgeError, match="follows no redirects"):
            ipcbridge.connect(srv.url)
        assert elsewhere.hits == []


def test_no_redirect_is_followed_at_all() -> None:
    with Hostile(lambda h: answer(h, b"", 302, Location="/v2" + h.path)) as srv:
        with pytest.raises(BridgeError, match=rf"redirected \(HTTP 302\) to {srv.url}/v2/v1/models"):
            HttpEndpoint(srv.url, timeout=5).request("GET", "/v1/models")
        assert srv.hits == ["/v1/models"]


def trickle_body(handler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "100")
    handler.end_headers()
    for _ in range(100):
        handler.wfile.write(b" ")
        handler.wfile.flush()
        time.sleep(0.2)


def trickle_headers(handler) -> None:
    handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
    for _ in range(100):
        handler.wfile.write(b"X")
        handler.wfile.flush()
        time.sleep(0.2)


@pytest.mark.parametrize("behave", [trickle_body, trickle_headers])
def test_a_trickling_server_cannot_stretch_the_deadline(behave) -> None:
    with Hostile(behave) as srv:
        t0 = time.monotonic()
        with pytest.raises(BridgeError, match=r"timed out after 1\.0s \(a total deadline"):
            HttpEndpoint(srv.url, timeout=1.0).request("GET", "/v1/models")
        assert time.monotonic() - t0 < 2.0


def test_an_announced_huge_body_is_refused_unread() -> None:
    def huge(handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(300 << 20))
        handler.end_headers()
        handler.wfile.write(b"[" * 1024)
        time.sleep(5)

    with Hostile(huge) as srv:
        t0 = time.monotonic()
        with pytest.raises(BridgeError, match=rf"announces {300 << 20} bytes, more than the limit of {MAX_BODY_BYTES}"):
            HttpEndpoint(srv.url, timeout=10).request("GET", "/v1/models")
        assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("cap", [None, 4096])
def test_an_endless_body_is_cut_at_the_cap(cap: int | None) -> None:
    sent = [0]

    def endless(handler) -> None:
        handler.send_response(200)
        handler.send_header("Connection", "close")  # no length: the body runs until the server closes
        handler.end_headers()
        for _ in range(300):
            handler.wfile.write(b" " * (1 << 20))
            sent[0] += 1 << 20

    limit = MAX_BODY_BYTES if cap is None else cap
    with Hostile(endless) as srv:
        ep = HttpEndpoint(srv.url, timeout=20) if cap is None else HttpEndpoint(srv.url, timeout=20, max_body_bytes=cap)
        with pytest.raises(BridgeError, match=rf"sent more than the limit of {limit} bytes"):
            ep.request("GET", "/v1/models")
    assert sent[0] < 300 << 20


def test_deep_json_in_a_body_is_a_bridge_error() -> None:
    with Hostile(lambda h: answer(h, b"[" * 100_000 + b"]" * 100_000)) as srv, \
            pytest.raises(BridgeError, match="nested deeper than 64 levels"):
        HttpEndpoint(srv.url, timeout=5).request("GET", "/v1/models")


def test_deep_json_in_a_worker_reply_is_a_bridge_error() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    with Hostile(lambda h: answer(h, json.dumps({"results": [deep]}).encode())) as srv, \
            pytest.raises(BridgeError, match="a worker reply: JSON nested deeper than 64 levels"):
        HttpEndpoint(srv.url, timeout=5).manifest()


def test_http_endpoint_is_exported_without_vllm() -> None:
    import subprocess
    import sys

    from ipcbridge.vllm import HttpEndpoint as Exported

    assert Exported is HttpEndpoint
    code = "import sys; from ipcbridge.vllm import HttpEndpoint; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
