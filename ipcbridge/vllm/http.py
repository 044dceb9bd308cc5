"""The endpoint for ``vllm serve`` over HTTP (standard library only).

Needs the server started with ``VLLM_SERVER_DEV_MODE=1`` (which adds ``/collective_rpc``, ``/pause``,
``/resume`` and ``/reset_prefix_cache``) and ``--worker-extension-cls ipcbridge.vllm.WorkerExtension``, on the
trainer's machine (CUDA IPC is same-machine only).

Note [the HTTP fence]
    ``POST /pause?mode=wait`` returns once every in-flight request has finished on the old weights; requests
    that arrive meanwhile are queued, not run. Then the step runs and the trainer synchronises its device
    (``Bridge.update``), ``POST /reset_prefix_cache`` drops KV blocks computed with the old weights,
    ``POST /collective_rpc ipcbridge_set_weight_version`` records the new version in the worker, and
    ``POST /resume`` lets the queued requests run on the new weights. Each response therefore comes from
    exactly one weight version.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from ipcbridge.errors import BridgeError
from ipcbridge.manifest import Manifest
from ipcbridge.vllm.extension import EXTENSION_QUALNAME, Reply

logger = logging.getLogger(__name__)

DEV_ROUTES = ("/collective_rpc", "/pause", "/resume", "/reset_prefix_cache", "/is_paused")


class HttpEndpoint:
    """The control channel of a ``vllm serve`` process, by URL. See Note [the HTTP fence].

    ``timeout`` bounds ordinary calls; ``pause_timeout`` bounds ``/pause?mode=wait``, which lasts as long as
    the longest request in flight.
    """

    name = "vllm-http"

    def __init__(self, url: str, timeout: float = 60.0, pause_timeout: float = 600.0) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise BridgeError(f"not an http(s) URL: {url!r}; pass e.g. 'http://127.0.0.1:8000'")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.pause_timeout = pause_timeout
        self.weight_version = 0
        self._model_id: str | None = None

    # -- transport -----------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None,
                timeout: float | None = None) -> Any:
        """One HTTP call; the decoded JSON body (``None`` for an empty body). Failures raise ``BridgeError``."""
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        timeout = self.timeout if timeout is None else timeout
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode("utf-8", "replace")
            if e.code == 404 and path in DEV_ROUTES:
                raise BridgeError(
                    f"{method} {url} -> 404: the server has no {path} route. Start vllm serve with "
                    "VLLM_SERVER_DEV_MODE=1 (it enables /collective_rpc, /pause, /resume, /reset_prefix_cache)"
                ) from None
            hint = ""
            if path == "/collective_rpc" and "ipcbridge_" in detail:
                hint = (f". Is the server started with --worker-extension-cls {EXTENSION_QUALNAME} and ipcbridge "
                        "importable in its environment?")
            raise BridgeError(f"{method} {url} -> HTTP {e.code}: {detail}{hint}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                raise BridgeError(
                    f"{method} {url} timed out after {timeout}s; the server is busy or hung (raise timeout=...)"
                ) from None
            raise BridgeError(
                f"cannot reach vllm serve at {self.url} ({e.reason}); is it running, on this machine, at this "
                "port?"
            ) from None
        except TimeoutError:  # socket.timeout is TimeoutError
            raise BridgeError(
                f"{method} {url} timed out after {timeout}s; the server is busy or hung (raise timeout=...)"
            ) from None
        except (ConnectionError, OSError) as e:
            raise BridgeError(f"{method} {url} failed: {e}; is vllm serve still running?") from None
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BridgeError(
                f"{method} {url} returned a body that is not JSON ({e}): {raw[:200]!r}; is this URL a vllm "
                "serve server?"
            ) from None

    def rpc(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """``POST /collective_rpc`` of an ``ipcbridge_*`` method; arguments travel as strings."""
        timeout = self.timeout if timeout is None else timeout
        body = {"method": method, "args": [str(a) for a in args], "timeout": timeout}
        resp = self.request("POST", "/collective_rpc", body, timeout=timeout + 5)
        if not isinstance(resp, dict) or not isinstance(resp.get("results"), list):
            raise BridgeError(f"/collective_rpc({method}) returned {str(resp)[:200]!r}, expected {{'results': [...]}}")
        results = resp["results"]
        if len(results) != 1:
            raise BridgeError(
                f"/collective_rpc({method}) answered from {len(results)} workers; ipcbridge attaches to one "
                "worker (tensor_parallel_size=1, pipeline_parallel_size=1)"
            )
        return Reply.from_json(results[0], where=f"vllm serve at {self.url}").unwrap()

    # -- Endpoint --------------------------------------------------------------------------------------

    def manifest(self) -> Manifest:
        m = Manifest.from_dict(self.rpc("ipcbridge_manifest"))
        self.weight_version = m.weight_version
        return m

    def pause(self) -> None:
        self.request("POST", "/pause", query={"mode": "wait"}, timeout=self.pause_timeout)

    def resume(self, weight_version: int) -> None:
        try:
            self.request("POST", "/reset_prefix_cache")
            self.weight_version = self.rpc("ipcbridge_set_weight_version", int(weight_version))
        finally:
            # Never leave the server paused, even if the bookkeeping failed.
            self.request("POST", "/resume")

    def engine_weight_version(self) -> int:
        return int(self.rpc("ipcbridge_weight_version"))

    def is_paused(self) -> bool:
        return bool((self.request("GET", "/is_paused") or {}).get("is_paused"))

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
            "return_token_ids": True, "return_tokens_as_token_ids": True,
        }
        resp = self.request("POST", "/v1/completions", body, timeout=timeout)
        try:
            choice = resp["choices"][0]
            tokens = [int(t) for t in choice["token_ids"]]
            lps = [float(x) for x in choice["logprobs"]["token_logprobs"]]
        except (TypeError, KeyError, IndexError, ValueError):
            raise BridgeError(f"/v1/completions returned {str(resp)[:300]!r}; expected token_ids and logprobs") from None
        return tokens, lps

    def sample(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        return self.complete(prompt, max_tokens)

    def close(self) -> None:
        pass
