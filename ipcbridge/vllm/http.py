"""The endpoint for ``vllm serve`` over HTTP (standard library only).

Needs the server started with ``VLLM_SERVER_DEV_MODE=1`` (which adds ``/collective_rpc``, ``/pause``,
``/resume`` and ``/reset_prefix_cache``) and ``--worker-extension-cls ipcbridge.vllm.WorkerExtension`` (or
a subclass), on the trainer's machine (CUDA IPC is same-machine only). Everything but the transport is
shared with the in-process endpoints (:class:`~ipcbridge.vllm.base.VllmEndpoint`).

Note [the HTTP fence]
    The lease is kept in the trainer's process, one gate per normalised server URL (:func:`normalise_url`),
    so two bridges of one trainer on one server never interleave their fences. ``POST /pause?mode=wait``
    returns once every in-flight request has finished on the old weights; requests that arrive meanwhile are
    queued, not run. Then the step runs and the trainer synchronises its device, ``POST /reset_prefix_cache``
    drops KV blocks computed with the old weights, ``POST /collective_rpc ipcbridge_publish_weight_version``
    moves the worker's version forward, and ``POST /resume`` lets the queued requests run on the new
    weights (in a ``finally``: a failed reset or publish still resumes). Each response therefore comes from
    exactly one weight version. vLLM itself has no lease: if the trainer process *dies* mid-fence, the
    server stays paused until someone calls ``POST /resume`` (``curl -X POST http://host:port/resume``); a
    trainer that *hangs* mid-fence is resumed by the lease watchdog (a thread of the trainer's process) when
    its lease runs out. Leases of different trainer processes on one server do not see each other.
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
from ipcbridge.vllm.base import VllmEndpoint
from ipcbridge.vllm.extension import EXTENSION_QUALNAME

logger = logging.getLogger(__name__)

DEV_ROUTES = ("/collective_rpc", "/pause", "/resume", "/reset_prefix_cache", "/is_paused")


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
    """The control channel of a ``vllm serve`` process, by URL. See Note [the HTTP fence].

    ``timeout`` bounds ordinary calls; ``pause_timeout`` bounds ``/pause?mode=wait``, which lasts as long as
    the longest request in flight.
    """

    name = "vllm-http"

    def __init__(self, url: str, timeout: float = 60.0, pause_timeout: float = 600.0) -> None:
        self.url = normalise_url(url)
        self.gate_key = self.url
        self.where = f"vllm serve at {self.url}"
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
            raise _http_error(method, url, path, e) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                raise _timed_out(method, url, timeout) from None
            raise BridgeError(
                f"cannot reach vllm serve at {self.url} ({e.reason}); is it running, on this machine, at this "
                "port?"
            ) from None
        except TimeoutError:  # socket.timeout is TimeoutError
            raise _timed_out(method, url, timeout) from None
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

    def collective_rpc(self, method: str, *args: Any) -> Any:
        """``POST /collective_rpc`` of an ``ipcbridge_*`` method; arguments travel as strings."""
        body = {"method": method, "args": [str(a) for a in args], "timeout": self.timeout}
        resp = self.request("POST", "/collective_rpc", body, timeout=self.timeout + 5)
        if not isinstance(resp, dict) or not isinstance(resp.get("results"), list):
            raise BridgeError(f"/collective_rpc({method}) returned {str(resp)[:200]!r}, expected {{'results': [...]}}")
        return resp["results"]

    # -- the fence's engine half (Note [the HTTP fence]) -----------------------------------------------

    def engine_pause(self) -> None:
        self.request("POST", "/pause", query={"mode": "wait"}, timeout=self.pause_timeout)

    def reset_prefix_cache(self) -> None:
        self.request("POST", "/reset_prefix_cache")

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


def _http_error(method: str, url: str, path: str, e: urllib.error.HTTPError) -> BridgeError:
    detail = e.read()[:500].decode("utf-8", "replace")
    if e.code == 404 and path in DEV_ROUTES:
        return BridgeError(
            f"{method} {url} -> 404: the server has no {path} route. Start vllm serve with "
            "VLLM_SERVER_DEV_MODE=1 (it enables /collective_rpc, /pause, /resume, /reset_prefix_cache)"
        )
    hint = ""
    if path == "/collective_rpc" and "ipcbridge_" in detail:
        hint = (f". Is the server started with --worker-extension-cls {EXTENSION_QUALNAME} and ipcbridge "
                "importable in its environment?")
    return BridgeError(f"{method} {url} -> HTTP {e.code}: {detail}{hint}")


def _timed_out(method: str, url: str, timeout: float) -> BridgeError:
    return BridgeError(f"{method} {url} timed out after {timeout}s; the server is busy or hung (raise timeout=...)")
