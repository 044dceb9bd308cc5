"""The endpoint for ``vllm serve`` over HTTP (standard library only).

Needs the server started with ``VLLM_SERVER_DEV_MODE=1`` (which adds ``/collective_rpc``, ``/pause``,
``/resume`` and ``/reset_prefix_cache``) and ``--worker-extension-cls ipcbridge.vllm.WorkerExtension`` (or
a subclass), on the trainer's machine (CUDA IPC is same-machine only). Everything but the transport is
shared with the in-process endpoints (:class:`~ipcbridge.vllm.base.VllmEndpoint`).

Note [the HTTP fence]
    The lease is kept in the trainer's process, one gate per normalised server URL (:func:`normalise_url`),
    so two bridges of one trainer on one server never interleave their fences. ``POST /pause?mode=wait``
    returns once every in-flight request has finished on the old weights; requests that arrive meanwhile are
    queued (up to vLLM 0.32) or rejected with a retryable HTTP 503 (0.33+; Note [the AsyncLLM pause] in
    :mod:`ipcbridge.vllm.endpoints`), never run. ``clear_cache=false``: the fence drops stale KV itself,
    once. Then the step runs and the trainer synchronises its device, ``POST /reset_prefix_cache`` drops
    KV blocks computed with the old weights (0.26+ answers ``{"success": bool}``, and ``false`` is an
    error; with ``kv_reset="salted"`` there is no reset, Note [stale KV: reset or salt] in
    :mod:`ipcbridge.vllm.base`), ``POST /collective_rpc ipcbridge_publish_weight_version`` moves the
    worker's version forward, ``POST /update_weight_version`` hands it to vLLM where the server has that
    route (0.27+, found by ``GET /weight_info`` at connect), and ``POST /resume`` lets queued requests run
    on the new weights (in a ``finally``: a failed reset or publish still resumes). Each response
    therefore comes from exactly one weight version. vLLM itself has no lease: if the trainer process *dies* mid-fence, the
    server stays paused until someone calls ``POST /resume`` (``curl -X POST http://host:port/resume``); a
    trainer that *hangs* mid-fence is resumed by the lease watchdog (a thread of the trainer's process) when
    its lease runs out. Leases of different trainer processes on one server do not see each other.

Note [what the HTTP client trusts]
    Whatever answers at the URL can send a manifest (Note [the trust model] in
    :mod:`ipcbridge.transports.provenance` says what one can reach), so the client trusts the answer no
    further than it must. It follows no redirect: a 3xx from the URL it was given is refused naming the
    target, since a redirect could hand it another server's manifest or fence; connect to the final URL
    instead. Each request has one *total* deadline, from connecting to the last byte (a server trickling a
    byte at a time cannot stretch it), a body cap (:data:`MAX_BODY_BYTES`, checked against
    ``Content-Length`` first and enforced while reading), and the JSON depth limit of
    :func:`ipcbridge.wire.parse_json`, which also applies to each worker reply inside ``/collective_rpc``.
    Each refusal is a ``BridgeError`` that names the URL and what to change.

Note [a 503 during a fence]
    From vLLM 0.33 a server paused in mode ``"wait"`` rejects each new request with a retryable HTTP 503
    until it resumes (Note [the AsyncLLM pause] in :mod:`ipcbridge.vllm.endpoints`); up to 0.32 it queues
    it. A completion that meets a fence (another client's, or a generation thread racing this trainer's
    step) is therefore retried, with a doubling backoff (:data:`RETRY_FIRST_DELAY` to
    :data:`RETRY_MAX_DELAY`), within the one total deadline of the call: a fence lasts an optimizer step,
    a paused server that never resumes (its trainer died mid-fence) ends in a ``BridgeError`` naming the
    ``/resume`` that frees it. Only ``/v1/completions`` is retried: the control routes must not meet
    another fence (the lease says so), and a 503 there is an error.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import threading
import time
import urllib.parse
from typing import Any

from ipcbridge import wire
from ipcbridge.errors import BridgeError
from ipcbridge.manifest import Manifest
from ipcbridge.vllm.base import VllmEndpoint, check_kv_reset
from ipcbridge.vllm.extension import EXTENSION_QUALNAME
from ipcbridge.vllm.features import VllmFeatures

logger = logging.getLogger(__name__)

DEV_ROUTES = ("/collective_rpc", "/pause", "/resume", "/reset_prefix_cache", "/is_paused")
#: The largest response body read. The largest legitimate one, a manifest of a 400B model inside a
#: ``/collective_rpc`` reply, is about 1 MB; 16 MiB is ample and bounds what a server can make us buffer.
MAX_BODY_BYTES = 16 * 1024 * 1024
#: Bytes of an error body quoted in a message.
_ERROR_DETAIL_BYTES = 500
#: Note [a 503 during a fence]: the status retried, and the backoff (doubling from the first delay).
HTTP_RETRY = 503
RETRY_FIRST_DELAY = 0.05
RETRY_MAX_DELAY = 1.0


def normalise_url(url: str) -> str:
    """``scheme://host:port[/path]`` with the host lower-cased, the default port explicit, no trailing ``/``.

    Two spellings of one server (``http://Host:80/`` and ``http://host``) get one lease gate. Different
    names of one machine (``localhost`` and ``127.0.0.1``) do not: use one spelling per trainer.
    """
    try:
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port
    except (ValueError, AttributeError):
        raise BridgeError(f"not an http(s) URL: {url!r}; pass e.g. 'http://127.0.0.1:8000'") from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise BridgeError(f"not an http(s) URL: {url!r}; pass e.g. 'http://127.0.0.1:8000'")
    host = parsed.hostname
    if ":" in host:
        host = f"[{host}]"  # IPv6
    port = port or (443 if parsed.scheme == "https" else 80)
    return f"{parsed.scheme}://{host}:{port}{parsed.path.rstrip('/')}"


class HttpEndpoint(VllmEndpoint):
    """The control channel of a ``vllm serve`` process, by URL. See Note [the HTTP fence] and Note [what the
    HTTP client trusts].

    ``timeout`` bounds each ordinary request in total (connect to last byte); ``pause_timeout`` bounds
    ``/pause?mode=wait``, which lasts as long as the longest request in flight. ``max_body_bytes`` caps a
    response body.
    """

    name = "vllm-http"

    def __init__(self, url: str, timeout: float = 60.0, pause_timeout: float = 600.0, *,
                 max_body_bytes: int = MAX_BODY_BYTES, kv_reset: str = "always") -> None:
        self.kv_reset = check_kv_reset(kv_reset)
        self.features = VllmFeatures()  # until probe_features() (at the first manifest) finds more
        self._probed = False
        self.url = normalise_url(url)
        self.gate_key = self.url
        self.where = f"vllm serve at {self.url}"
        self.timeout = timeout
        self.pause_timeout = pause_timeout
        self.max_body_bytes = max_body_bytes
        self.weight_version = 0
        self._model_id: str | None = None

    # -- transport -----------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None,
                timeout: float | None = None) -> Any:
        """One HTTP call; the decoded JSON body (``None`` for an empty body). Failures raise ``BridgeError``."""
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        timeout = self.timeout if timeout is None else timeout
        status, location, raw = _exchange(method, url, data, timeout, self.max_body_bytes, self.url)
        return self._decode(method, url, path, status, location, raw)

    def _decode(self, method: str, url: str, path: str, status: int, location: str | None, raw: bytes) -> Any:
        if 300 <= status < 400:
            raise _redirected(method, url, status, location)
        if status >= 400:
            raise _http_error(method, url, path, status, raw)
        if not raw.strip():
            return None
        return wire.parse_json(raw, f"{method} {url}: the response body", max_bytes=self.max_body_bytes,
                               error=BridgeError, hint="; is this URL a vllm serve server?")

    def completions(self, body: dict[str, Any], timeout: float | None = None) -> Any:
        """``POST /v1/completions`` with ``body``; the decoded response. Note [a 503 during a fence]: an
        HTTP 503 is retried with backoff while ``timeout`` (total, over every try) lasts."""
        url, path = self.url + "/v1/completions", "/v1/completions"
        data = json.dumps(body).encode()
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay, tries = RETRY_FIRST_DELAY, 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _timed_out("POST", url, timeout)
            status, location, raw = _exchange("POST", url, data, left, self.max_body_bytes, self.url)
            tries += 1
            if status != HTTP_RETRY or deadline - time.monotonic() <= delay:
                break
            logger.debug("%s answered 503 (a fence in progress?); retrying in %.2f s", url, delay)
            time.sleep(delay)
            delay = min(2 * delay, RETRY_MAX_DELAY)
        if status == HTTP_RETRY:
            raise BridgeError(
                f"POST {url} answered HTTP 503 to {tries} tries over {timeout:.0f}s: the server stays paused (a fence "
                f"that never resumed, e.g. its trainer died: `curl -X POST {self.url}/resume`) or overloaded; "
                f"{raw[:_ERROR_DETAIL_BYTES].decode('utf-8', 'replace')}"
            )
        return self._decode("POST", url, path, status, location, raw)

    def collective_rpc(self, method: str, *args: Any) -> Any:
        """``POST /collective_rpc`` of an ``ipcbridge_*`` method; arguments travel as strings."""
        body = {"method": method, "args": [str(a) for a in args], "timeout": self.timeout}
        resp = self.request("POST", "/collective_rpc", body, timeout=self.timeout + 5)
        if not isinstance(resp, dict) or not isinstance(resp.get("results"), list):
            raise BridgeError(f"/collective_rpc({method}) returned {str(resp)[:200]!r}, expected {{'results': [...]}}")
        for r in resp["results"]:  # each is a worker's JSON reply, decoded later: Note [what the HTTP client trusts]
            if isinstance(r, (str, bytes)):
                wire.check_json_depth(r, f"/collective_rpc({method}) at {self.url}: a worker reply",
                                      error=BridgeError, hint="; is this URL a vllm serve server?")
        return resp["results"]

    def status(self, method: str, path: str) -> int:
        """The HTTP status of one bodiless request (a probe: a 404 is an answer here, not an error)."""
        status, _, _ = _exchange(method, self.url + path, None, self.timeout, self.max_body_bytes, self.url)
        return status

    def probe_features(self) -> VllmFeatures:
        """What the server offers, from the routes that answer (Note [probe features, not versions])."""
        if not self._probed:
            has_version = self.status("GET", "/weight_info") == 200
            self.features = VllmFeatures(engine_weight_version=has_version)
            self._probed = True
            logger.debug("%s: %s", self.where, self.features.describe())
        return self.features

    def manifest(self) -> Manifest:
        self.probe_features()
        return super().manifest()

    # -- the fence's engine half (Note [the HTTP fence]) -----------------------------------------------

    def engine_pause(self) -> None:
        self.request("POST", "/pause", query={"mode": "wait", "clear_cache": "false"}, timeout=self.pause_timeout)

    def reset_prefix_cache(self) -> bool | None:
        """``True``/``False`` as the server reports it (0.26+), ``None`` when it answers with an empty body."""
        resp = self.request("POST", "/reset_prefix_cache")
        if isinstance(resp, dict) and "success" in resp:
            return resp["success"] is True
        return None

    def set_engine_weight_version(self, version: str) -> None:
        self.request("POST", "/update_weight_version", {"new_version": version})

    def resume_generation(self) -> None:
        self.request("POST", "/resume")

    def is_paused(self) -> bool:
        return bool((self.request("GET", "/is_paused") or {}).get("is_paused"))

    # -- generation ------------------------------------------------------------------------------------

    def model_id(self) -> str:
        if self._model_id is None:
            resp = self.request("GET", "/v1/models")
            try:
                self._model_id = str(resp["data"][0]["id"])
            except (TypeError, KeyError, IndexError):
                raise BridgeError(f"GET /v1/models returned {str(resp)[:200]!r}; no served model") from None
        return self._model_id

    def complete(self, prompt: list[int], max_tokens: int, temperature: float = 0.0,
                 timeout: float | None = None) -> tuple[list[int], list[float]]:
        """``POST /v1/completions`` from token ids: the new tokens and their logprobs."""
        body = {
            "model": self.model_id(), "prompt": list(prompt), "max_tokens": max_tokens,
            "temperature": temperature, "ignore_eos": True, "logprobs": 0,
            "return_token_ids": True, "return_tokens_as_token_ids": True, "cache_salt": self.cache_salt(),
        }
        resp = self.completions(body, timeout)
        try:
            choice = resp["choices"][0]
            tokens = [int(t) for t in choice["token_ids"]]
            lps = [float(x) for x in choice["logprobs"]["token_logprobs"]]
        except (TypeError, KeyError, IndexError, ValueError):
            raise BridgeError(f"/v1/completions returned {str(resp)[:300]!r}; expected token_ids and logprobs") from None
        return tokens, lps

    def sample(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        return self.complete(prompt, max_tokens)


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urllib.parse.urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    return cls(parts.hostname or "", parts.port, timeout=timeout), target


def _cut(conn: http.client.HTTPConnection, fired: threading.Event) -> None:
    """The total deadline has passed: wake whatever is blocked on the socket (connect, send or read)."""
    fired.set()
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, also under TLS


def _exchange(method: str, url: str, data: bytes | None, timeout: float, max_body: int,
              base: str) -> tuple[int, str | None, bytes]:
    """(status, Location header, body) of one request, all within ``timeout`` seconds in total and with a body
    of at most ``max_body`` bytes. Follows nothing (Note [what the HTTP client trusts])."""
    conn, target = _connection(url, timeout)
    fired = threading.Event()
    timer = threading.Timer(timeout, _cut, (conn, fired))
    timer.daemon = True
    timer.start()
    try:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        conn.request(method, target, body=data, headers=headers)
        resp = conn.getresponse()
        declared = resp.getheader("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > max_body:
            raise _too_big(method, url, f"announces {int(declared)} bytes, more", max_body)
        raw = resp.read(max_body + 1)
        if fired.is_set():  # the cut makes reads end early rather than fail: never take that for an answer
            raise TimeoutError
        if len(raw) > max_body:
            raise _too_big(method, url, "sent more", max_body)
        if resp.length:  # bytes announced but never sent
            raise http.client.IncompleteRead(raw, resp.length)
        return resp.status, resp.getheader("Location"), raw
    except BridgeError:
        raise
    except (OSError, http.client.HTTPException) as e:
        if fired.is_set() or isinstance(e, TimeoutError):
            raise _timed_out(method, url, timeout) from None
        if isinstance(e, (ConnectionRefusedError, socket.gaierror)) or not _connected(conn):
            raise BridgeError(
                f"cannot reach vllm serve at {base} ({e}); is it running, on this machine, at this port?"
            ) from None
        raise BridgeError(f"{method} {url} failed: {e}; is vllm serve still running?") from None
    finally:
        timer.cancel()
        conn.close()


def _connected(conn: http.client.HTTPConnection) -> bool:
    return conn.sock is not None


def _too_big(method: str, url: str, what: str, max_body: int) -> BridgeError:
    return BridgeError(
        f"{method} {url}: the response {what} than the limit of {max_body} bytes, so it was not read; is this URL a "
        "vllm serve server? (raise HttpEndpoint(max_body_bytes=...) only for a server you trust)"
    )


def _redirected(method: str, url: str, status: int, location: str | None) -> BridgeError:
    target = urllib.parse.urljoin(url, location) if location else "(no Location header)"
    parts = urllib.parse.urlsplit(target)
    final = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else target
    return BridgeError(
        f"{method} {url} redirected (HTTP {status}) to {target}; ipcbridge follows no redirects, since one could "
        f"hand it another server's weights. Pass the final URL instead, e.g. ipcbridge.connect({final!r})"
    )


def _http_error(method: str, url: str, path: str, status: int, raw: bytes) -> BridgeError:
    detail = raw[:_ERROR_DETAIL_BYTES].decode("utf-8", "replace")
    if status == 404 and path in DEV_ROUTES:
        return BridgeError(
            f"{method} {url} -> 404: the server has no {path} route. Start vllm serve with "
            "VLLM_SERVER_DEV_MODE=1 (it enables /collective_rpc, /pause, /resume, /reset_prefix_cache)"
        )
    hint = ""
    if path == "/collective_rpc" and "ipcbridge_" in detail:
        hint = (f". Is the server started with --worker-extension-cls {EXTENSION_QUALNAME} and ipcbridge "
                "importable in its environment?")
    return BridgeError(f"{method} {url} -> HTTP {status}: {detail}{hint}")


def _timed_out(method: str, url: str, timeout: float) -> BridgeError:
    return BridgeError(
        f"{method} {url} timed out after {timeout}s (a total deadline, connect to last byte); the server is busy, "
        "hung or trickling its answer (raise timeout=...)"
    )
