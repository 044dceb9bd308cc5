"""connect(): attach to an engine's weights and fence updates against its generation.

A :class:`Bridge` pairs an attached HF model (and the :class:`~ipcbridge.attach.Attachment` that says which
memory it aliases) with an :class:`~ipcbridge.endpoints.Endpoint`, the engine's control channel. Its
``update()`` is the shared fence of :mod:`ipcbridge.fence` (Note [the fence]); the engine owns the weight
version, and the bridge reports the one the engine published last.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ipcbridge import mapping
from ipcbridge.attach import Attachment, attach_with_attachment
from ipcbridge.endpoints import CanSample, Endpoint, resolve_endpoint
from ipcbridge.errors import BridgeError
from ipcbridge.fence import DEFAULT_LEASE_SECONDS, DEFAULT_WAIT_SECONDS, Fence, check_settings, synchronize
from ipcbridge.logprobs import sequence_logprobs
from ipcbridge.manifest import Manifest

logger = logging.getLogger(__name__)


@dataclass
class CheckReport:
    """The attach self-test. ``ok`` is coverage and zero copy; parity is reported, not judged."""

    hf_parameters: int
    engine_tensors: int
    engine_tensors_used: int
    parameters_outside_engine: list[str]
    trainer_weight_bytes: int
    model_weight_bytes: int
    logprob_mean_abs_diff: float | None = None
    logprob_max_abs_diff: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.engine_tensors_used == self.engine_tensors and not self.parameters_outside_engine


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameters (a tied weight counts once, as ``parameters()`` yields it)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Bridge:
    """An attached HF model plus the engine it aliases. Make one with :func:`connect`.

    ``model``'s parameters are views of the engine's weights: an optimizer step on them *is* a weight
    update. Do it inside ``with bridge.update():`` so the engine never generates from half-written weights.
    The views stay valid while the bridge is open and the engine keeps its weights; :meth:`close` drops
    them (the model object then has no engine memory behind it).
    """

    def __init__(self, endpoint: Endpoint, model: nn.Module, attachment: Attachment, manifest: Manifest, *,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS, wait: float = DEFAULT_WAIT_SECONDS) -> None:
        self.endpoint = endpoint
        self.model: nn.Module | None = model
        self.manifest = manifest
        self.attach_seconds: float = 0.0
        self._attachment: Attachment | None = attachment
        holder = f"bridge {secrets.token_hex(3)} (pid {os.getpid()}, {endpoint.name})"
        self._fence = Fence(endpoint, holder=holder, version=manifest.weight_version,
                            sync=lambda: synchronize(self._model()), lease_seconds=lease_seconds, wait=wait)

    @property
    def transport(self) -> str:
        return self.manifest.transport

    @property
    def weight_version(self) -> int:
        """The weight version the engine published at this bridge's last resume (the manifest's before)."""
        return self._fence.version

    @property
    def fence_seconds(self) -> list[float]:
        """How long each fence kept the engine paused, minus the block's own time."""
        return self._fence.seconds

    def fence_seconds_median(self) -> float | None:
        return self._fence.median_seconds()

    def _model(self) -> nn.Module:
        if self.model is None:
            raise BridgeError("this Bridge is closed; call ipcbridge.connect(...) again")
        return self.model

    def _attached(self) -> tuple[nn.Module, Attachment]:
        model, att = self._model(), self._attachment
        if att is None:  # close() clears both; nothing else does
            raise BridgeError("this Bridge is closed; call ipcbridge.connect(...) again")
        return model, att

    @contextmanager
    def update(self) -> Iterator[Bridge]:
        """Fence a weight update (Note [the fence] in :mod:`ipcbridge.fence`).

        Raises ``FenceError`` if called inside another ``update()`` of an engine this thread holds, if
        another holder keeps the engine paused longer than ``wait``, or if the lease ran out before the
        block ended (call :meth:`renew` in long blocks).
        """
        self._model()
        with self._fence.hold():
            yield self

    def renew(self) -> None:
        """Extend the current update's lease by its length (for a block that takes longer than it)."""
        self._fence.renew()

    # -- the self-test -------------------------------------------------------------------------------

    def parameters_outside_engine(self) -> list[str]:
        """Names of the model's parameters whose bytes do not lie in the engine's memory (none when aliased)."""
        model, att = self._attached()
        return att.outside(model)

    def trainer_weight_bytes(self) -> int:
        """Bytes of the model's parameters that do *not* lie in the engine's memory (0 when fully aliased)."""
        model, att = self._attached()
        return att.outside_bytes(model)

    def check(self, prompt: list[int] | None = None, max_tokens: int = 8, raise_on_failure: bool = True) -> CheckReport:
        """Coverage, zero copy and (if the endpoint can sample) logprob parity with the engine."""
        model, att = self._attached()
        engine_names = set(att.source_tensors)
        if att.layout == "vllm":
            used = {s.target for s in mapping.plan_from_vllm(engine_names, model.config)}
        else:
            used = engine_names
        outside = att.outside(model)
        report = CheckReport(
            hf_parameters=len(list(model.named_parameters(remove_duplicate=False))),
            engine_tensors=len(engine_names),
            engine_tensors_used=len(used & engine_names),
            parameters_outside_engine=outside,
            trainer_weight_bytes=att.outside_bytes(model),
            model_weight_bytes=model_weight_bytes(model),
        )
        if isinstance(self.endpoint, CanSample):
            tokens, engine_lp = self.endpoint.sample(prompt or [1, 2, 3, 4], max_tokens)
            hf_lp = sequence_logprobs(model, prompt or [1, 2, 3, 4], tokens)
            diffs = [abs(a - b) for a, b in zip(hf_lp, engine_lp, strict=False)]
            report.logprob_mean_abs_diff = sum(diffs) / len(diffs) if diffs else 0.0
            report.logprob_max_abs_diff = max(diffs, default=0.0)
        else:
            report.notes.append(f"parity not checked: endpoint {self.endpoint.name!r} cannot sample")
        if raise_on_failure and not report.ok:
            raise BridgeError(
                f"attach self-test failed: {report.engine_tensors_used}/{report.engine_tensors} engine tensors "
                f"used, parameters outside the engine's memory: {outside[:8]}"
            )
        return report

    # -- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the model's views and the endpoint. The engine itself keeps running."""
        if self.model is None:
            return
        if self._fence.active:
            raise BridgeError("close() inside `with bridge.update():`; leave the block first")
        att, self._attachment, self.model = self._attachment, None, None
        if att is not None:
            att.close()
        self.endpoint.close()

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(target: Any, *, config: Any = None, check: bool = False,
            lease_seconds: float = DEFAULT_LEASE_SECONDS, wait: float = DEFAULT_WAIT_SECONDS) -> Bridge:
    """Attach to ``target``'s weights and return a :class:`Bridge`.

    ``target``: a :class:`~ipcbridge.LocalEngine`, a ``vllm.LLM`` or ``AsyncLLM`` started with
    ``worker_extension_cls="ipcbridge.vllm.WorkerExtension"``, the URL of ``vllm serve`` (dev mode), or a
    :class:`Manifest`. ``check=True`` runs :meth:`Bridge.check` and raises if it fails. Each
    ``update()`` holds the engine's pause for at most ``lease_seconds`` (then the engine resumes by
    itself) and waits at most ``wait`` seconds for another holder's pause to end.
    """
    check_settings(lease_seconds, wait)  # before anything is attached
    endpoint = resolve_endpoint(target)
    t0 = time.perf_counter()
    try:
        manifest = endpoint.manifest()
        model, attachment = attach_with_attachment(manifest, config)
    except BaseException:
        endpoint.close()
        raise
    bridge = Bridge(endpoint, model, attachment, manifest, lease_seconds=lease_seconds, wait=wait)
    bridge.attach_seconds = time.perf_counter() - t0
    if check:
        try:
            bridge.check(raise_on_failure=True)
        except BaseException:
            bridge.close()
            raise
    logger.info("attached %d tensors over %s in %.3fs", len(manifest.tensors), manifest.transport,
                bridge.attach_seconds)
    return bridge
