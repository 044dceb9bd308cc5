"""The control channel of a stock vLLM engine (no ipcbridge extension) for :mod:`ipcbridge.stream.stock`.

Each control is an endpoint in the fence's sense (its pause is leased in this process:
:class:`~ipcbridge.endpoints.InProcessLeases`, one gate per engine object or URL, shared with any
``connect()`` bridge on the same engine) plus vLLM's four weight-transfer calls, which it reaches the way
vLLM exposes them: ``collective_rpc`` of the worker methods for ``LLM`` and ``AsyncLLM`` (their own
``init_weight_transfer_engine`` etc. wrap exactly that), the ``/init_weight_transfer_engine``,
``/start_weight_update``, ``/update_weights``, ``/finish_weight_update`` routes for ``vllm serve`` (dev
mode). None of them imports vLLM; the engine object is duck-typed.

A stock engine has no ipcbridge weight version, so the control counts its own: one per resume, from 0.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ipcbridge.endpoints import InProcessLeases, OnEventLoop, engine_loop
from ipcbridge.errors import BridgeError, reset_failed

logger = logging.getLogger(__name__)


class StockControl(InProcessLeases):
    """What :class:`~ipcbridge.stream.stock.StockStreamBridge` asks of a stock engine. Subclasses implement
    :meth:`call`, :meth:`world_size`, :meth:`version`, :meth:`engine_pause`, :meth:`reset_prefix_cache` and
    :meth:`resume_generation`; every failure is a ``BridgeError``."""

    name = "vllm-stock"
    weight_version = 0

    def call(self, method: str, payload: dict[str, Any] | None) -> None:
        """Run vLLM's weight-transfer ``method`` (``payload``: its keyword arguments) on every worker."""
        raise NotImplementedError

    def world_size(self) -> int:
        """The engine's workers across TP, PP and DP: the ranks after the trainer's."""
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def reset_prefix_cache(self) -> bool | None:
        """Drop the engine's prefix cache; ``False`` if vLLM reports the reset failed."""
        raise NotImplementedError

    def resume_generation(self) -> None:
        raise NotImplementedError

    def init(self, init_info: dict[str, Any]) -> None:
        self.call("init_weight_transfer_engine", {"init_info": init_info})

    def start(self) -> None:
        self.call("start_weight_update", None)

    def update(self, update_info: dict[str, Any]) -> None:
        self.call("update_weights", {"update_info": update_info})

    def finish(self) -> None:
        self.call("finish_weight_update", None)

    def engine_resume(self) -> int:
        """Drop KV computed with the old weights, resume generation (always), count a version."""
        try:
            reset = self.reset_prefix_cache()
        finally:
            self.resume_generation()
        self.weight_version += 1  # the weights did change, whatever the reset said
        if reset is False:
            raise reset_failed(self.name)
        return self.weight_version

    def close(self) -> None:
        """Nothing of the engine's to release."""


def _world_size(vllm_config: Any) -> int:
    parallel = vllm_config.parallel_config
    return int(getattr(parallel, "world_size_across_dp", None) or parallel.world_size)


def _check_config(vllm_config: Any, what: str) -> None:
    cfg = getattr(vllm_config, "weight_transfer_config", None)
    if cfg is None or getattr(cfg, "backend", None) != "nccl":
        raise BridgeError(
            f"this {what} was started without vLLM's NCCL weight transfer (weight_transfer_config={cfg!r}); start "
            "it with weight_transfer_config={'backend': 'nccl'}, or with ipcbridge's worker extension and "
            "receiver='ipcbridge'"
        )


def _vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


class LLMControl(StockControl):
    """An offline ``vllm.LLM``: ``generate`` blocks its caller, so the lease is the whole pause (as
    ``ipcbridge.vllm``'s Note [the LLM fence])."""

    name = "vllm-llm-stock"

    def __init__(self, llm: Any, timeout: float | None = 300.0) -> None:
        _check_config(llm.llm_engine.vllm_config, "vllm.LLM")
        self.llm = llm
        self.gate_key = llm
        self.timeout = timeout

    def call(self, method: str, payload: dict[str, Any] | None) -> None:
        try:
            self.llm.collective_rpc(method, timeout=self.timeout, kwargs=payload or {})
        except Exception as e:
            raise BridgeError(f"vLLM's {method} failed: {type(e).__name__}: {e}") from e

    def world_size(self) -> int:
        return _world_size(self.llm.llm_engine.vllm_config)

    def version(self) -> str:
        return _vllm_version()

    def engine_pause(self) -> None:
        pass

    def reset_prefix_cache(self) -> bool | None:
        return self.llm.reset_prefix_cache()

    def resume_generation(self) -> None:
        pass


class AsyncLLMControl(OnEventLoop, StockControl):
    """An in-process ``AsyncLLM``, driven from a thread other than its event loop's (``await
    asyncio.to_thread(ipcbridge.stream, engine, model)``); its pause waits for in-flight requests."""

    name = "vllm-async-llm-stock"

    def __init__(self, engine: Any, loop: asyncio.AbstractEventLoop | None = None,
                 timeout: float | None = 600.0) -> None:
        _check_config(engine.vllm_config, "AsyncLLM")
        self.loop = engine_loop(engine, loop)
        self.engine = engine
        self.gate_key = engine
        self.timeout = timeout

    def call(self, method: str, payload: dict[str, Any] | None) -> None:
        try:
            self._run(self.engine.collective_rpc(method, timeout=self.timeout, kwargs=payload or {}))
        except BridgeError:
            raise
        except Exception as e:
            raise BridgeError(f"vLLM's {method} failed: {type(e).__name__}: {e}") from e

    def world_size(self) -> int:
        return _world_size(self.engine.vllm_config)

    def version(self) -> str:
        return _vllm_version()

    def engine_pause(self) -> None:
        self._run(self.engine.pause_generation(mode="wait"))

    def reset_prefix_cache(self) -> bool | None:
        return self._run(self.engine.reset_prefix_cache())

    def resume_generation(self) -> None:
        self._run(self.engine.resume_generation())


class HttpControl(StockControl):
    """``vllm serve`` by URL, through an HTTP endpoint (``ipcbridge.vllm.http.HttpEndpoint``: its client,
    its pause and resume). Needs ``VLLM_SERVER_DEV_MODE=1`` for the weight-transfer and pause routes."""

    name = "vllm-http-stock"

    def __init__(self, http: Any, transfer_timeout: float) -> None:
        self.http = http
        self.gate_key = http.gate_key
        self.url = http.url
        self.transfer_timeout = transfer_timeout

    def call(self, method: str, payload: dict[str, Any] | None) -> None:
        self.http.request("POST", "/" + method, payload or {}, timeout=self.transfer_timeout)

    def world_size(self) -> int:
        resp = self.http.request("GET", "/get_world_size")
        n = resp.get("world_size") if isinstance(resp, dict) else None
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise BridgeError(f"GET {self.url}/get_world_size returned {str(resp)[:200]!r}; is VLLM_SERVER_DEV_MODE=1 "
                              "set on the server?")
        return n

    def version(self) -> str:
        resp = self.http.request("GET", "/version")
        if not isinstance(resp, dict) or not isinstance(resp.get("version"), str):
            raise BridgeError(f"GET {self.url}/version returned {str(resp)[:200]!r}; is this a vllm serve server?")
        return resp["version"]

    def engine_pause(self) -> None:
        self.http.engine_pause()

    def reset_prefix_cache(self) -> bool | None:
        return self.http.reset_prefix_cache()

    def resume_generation(self) -> None:
        self.http.resume_generation()
