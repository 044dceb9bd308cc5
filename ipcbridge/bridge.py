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
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ipcbridge import guard
from ipcbridge.attach import Attachment, attach_with_attachment
from ipcbridge.endpoints import CanSample, Endpoint, resolve_endpoint
from ipcbridge.errors import BridgeError
from ipcbridge.fence import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_WAIT_SECONDS,
    Fence,
    check_settings,
    cuda_devices,
    synchronize,
)
from ipcbridge.logprobs import sequence_logprobs
from ipcbridge.manifest import Manifest

logger = logging.getLogger(__name__)


#: Default tolerance of ``Bridge.check()``'s logprob parity (the largest absolute difference over the checked
#: tokens), by the weights' dtype. Measured: the embedded engine matches the attached model to 5e-7 in fp32
#: and exactly in bf16/fp16 (same kernels); vLLM's bf16 kernels differ from HF's by up to 0.008 on greedy
#: tokens (docs/vllm.md). A stale prefix cache after a write outside update() moved a tiny random Llama's
#: logprobs by 0.016, a larger write by whole nats.
PARITY_ATOL: dict[torch.dtype, float] = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 0.02,
                                         torch.bfloat16: 0.05}


class PrecisionWarning(UserWarning):
    """``connect()`` attached 16-bit weights: an optimizer stepping them directly rounds small updates away."""


@dataclass
class CheckReport:
    """The attach self-test. ``ok``: every engine tensor used, no parameter outside the engine's memory, and,
    when parity was measured, the engine's logprobs within ``parity_atol`` of the attached model's."""

    hf_parameters: int
    engine_tensors: int
    engine_tensors_used: int
    parameters_outside_engine: list[str]
    trainer_weight_bytes: int
    model_weight_bytes: int
    logprob_mean_abs_diff: float | None = None
    logprob_max_abs_diff: float | None = None
    #: The tolerance parity was judged against (on ``logprob_max_abs_diff``); ``None`` if not measured.
    parity_atol: float | None = None
    #: ``logprob_max_abs_diff <= parity_atol``; ``None`` if parity was not measured.
    parity_ok: bool | None = None
    #: Parameters written in place outside ``update()`` since the last fence (Note [the step guard]).
    unfenced_writes: list[str] = field(default_factory=list)
    #: What may be wrong, and the fix, when something is.
    hints: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.engine_tensors_used == self.engine_tensors and not self.parameters_outside_engine
                and self.parity_ok is not False)


#: What every method of a closed Bridge raises.
_CLOSED = "this Bridge is closed; call ipcbridge.connect(...) again"


def _first(names: list[str], n: int = 4) -> str:
    """The first ``n`` of ``names`` and how many there are, for messages."""
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return f"{names[:n]}{more}"


def parity_atol(model: nn.Module) -> float:
    """The default parity tolerance for ``model``'s weights: that of its least precise dtype."""
    return max(PARITY_ATOL.get(p.dtype, max(PARITY_ATOL.values())) for p in model.parameters())


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameters (a tied weight counts once, as ``parameters()`` yields it)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Bridge:
    """An attached HF model plus the engine it aliases. Make one with :func:`connect`.

    ``model``'s parameters are views of the engine's weights: an optimizer step on them *is* a weight
    update, and it must run inside ``with bridge.update():`` (any other step raises ``BridgeError``: Note
    [the step guard] in :mod:`ipcbridge.guard`). The views stay valid while the bridge is open and the
    engine keeps its weights; :meth:`close` detaches them: the old model and optimizer can no longer reach
    the engine (Note [close detaches the model]).
    """

    def __init__(self, endpoint: Endpoint, model: nn.Module, attachment: Attachment, manifest: Manifest, *,
                 lease_seconds: float = DEFAULT_LEASE_SECONDS, wait: float = DEFAULT_WAIT_SECONDS) -> None:
        self.endpoint = endpoint
        self.model: nn.Module | None = model
        self.manifest = manifest
        self.attach_seconds: float = 0.0
        self._attachment: Attachment | None = attachment
        holder = f"bridge {secrets.token_hex(3)} (pid {os.getpid()}, {endpoint.name})"
        self._watch: guard.Watch | None = guard.Watch(model)
        # update() checks that every parameter still aliases the attached memory before it pauses
        # (_check_aliases), so the devices to sync are the attached ones: no module walk per fence (~0.5 ms
        # for an 8B-shaped model's 291 parameters, measured on CPU).
        devices = cuda_devices(self._watch.params)
        self._fence = Fence(endpoint, holder=holder, version=manifest.weight_version,
                            sync=lambda: synchronize(devices), lease_seconds=lease_seconds, wait=wait)
        self._owner = guard.Owner(holder)
        guard.register(self._watch.params, self._owner)
        guard.guard_loads(model)
        weakref.finalize(self, self._owner.orphan).atexit = False

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
            raise BridgeError(_CLOSED)
        return self.model

    def _attached(self) -> tuple[nn.Module, Attachment]:
        model, att = self._model(), self._attachment
        if att is None:  # close() clears both; nothing else does
            raise BridgeError(_CLOSED)
        return model, att

    def _checked_watch(self) -> guard.Watch:
        watch = self._watch
        if watch is None:
            raise BridgeError(_CLOSED)
        return watch

    @contextmanager
    def update(self) -> Iterator[Bridge]:
        """Fence a weight update (Note [the fence] in :mod:`ipcbridge.fence`).

        Raises ``BridgeError`` before pausing if the model no longer aliases the engine's memory (a cast, a
        resize, a copy: the step would be lost), and ``FenceError`` if called inside another ``update()`` of
        an engine this thread holds, if another holder keeps the engine paused longer than ``wait``, or if
        the lease ran out before the block ended (call :meth:`renew` in long blocks). Optimizer steps on the
        model are allowed inside the block, in this thread (Note [the step guard]).
        """
        self._check_aliases(self._model())
        watch = self._checked_watch()
        with self._fence.hold():
            self._owner.enter()
            try:
                yield self
            finally:
                self._owner.leave()
                watch.recount()

    def _check_aliases(self, model: nn.Module) -> None:
        """``update()``'s check before it pauses: every parameter still the engine's memory (about 0.2 ms for
        an 8B-shaped model: Note [the alias check without a walk]). Also warns about writes made outside the
        last fence."""
        watch = self._checked_watch()
        moved = watch.moved(model, adopt=lambda p: guard.register([p], self._owner))
        if moved:
            total = len(list(model.named_parameters(remove_duplicate=False)))
            raise BridgeError(
                f"update() refused before pausing the engine: {len(moved)} of {total} parameters no longer alias "
                f"the engine's memory: {_first(moved)}. A cast (model.to(dtype), .half(), .float()), "
                "resize_token_embeddings, a .to() that copied, or a replaced parameter: steps on them would never "
                "reach the engine. Don't cast, move or resize an attached model; reconnect (bridge.close(); "
                "bridge = ipcbridge.connect(engine)) for a fresh one, or train weights the trainer owns with "
                "ipcbridge.stream(engine, model)"
            )
        written = watch.written()
        if written:
            logger.warning(
                "%s: %s were written in place outside `update()` since the last fence; the engine may have served "
                "them half-written and kept KV of the old weights. This update publishes them; do every write "
                "inside `with bridge.update():`", self._owner.name, _first(written),
            )

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

    def unfenced_writes(self) -> list[str]:
        """Names of parameters written in place outside ``update()`` since the last fence (or attach), as
        torch's version counters tell; writes through ``.data`` move no counter (Note [the step guard])."""
        return self._checked_watch().written()

    def check(self, prompt: list[int] | None = None, max_tokens: int = 8, raise_on_failure: bool = True, *,
              atol: float | None = None) -> CheckReport:
        """Coverage, zero copy and (if the endpoint can sample) logprob parity with the engine.

        Parity fails when the largest absolute logprob difference over the engine's greedy tokens exceeds
        ``atol`` (default: :data:`PARITY_ATOL` for the weights' dtype). ``report.hints`` says what may be
        wrong; with ``raise_on_failure`` a failed check raises ``BridgeError`` carrying them.
        """
        model, att = self._attached()
        engine_names = set(att.source_tensors)
        used = att.tensors_used(model)
        outside = att.outside(model)
        report = CheckReport(
            hf_parameters=len(list(model.named_parameters(remove_duplicate=False))),
            engine_tensors=len(engine_names),
            engine_tensors_used=len(used & engine_names),
            parameters_outside_engine=outside,
            trainer_weight_bytes=att.outside_bytes(model),
            model_weight_bytes=model_weight_bytes(model),
            unfenced_writes=self.unfenced_writes(),
        )
        if isinstance(self.endpoint, CanSample):
            _judge_parity(report, self.endpoint, model, prompt or [1, 2, 3, 4], max_tokens, atol)
        else:
            report.notes.append(f"parity not checked: endpoint {self.endpoint.name!r} cannot sample")
        _add_hints(report)
        if raise_on_failure and not report.ok:
            raise BridgeError(f"attach self-test failed: {_failures(report)}. " + " ".join(report.hints))
        return report

    # -- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Detach the model from the engine's memory and drop the endpoint. The engine itself keeps running.

        Afterwards nothing done with the old model or an optimizer built on it reaches the engine: the
        parameters (ties and parameters the model replaced included) no longer alias its memory, a forward
        raises ``BridgeError``, and so does an optimizer step (Note [close detaches the model]).
        """
        if self.model is None:
            return
        if self._fence.active:
            raise BridgeError("close() inside `with bridge.update():`; leave the block first")
        model, att = self.model, self._attachment
        self._attachment, self.model, self._watch = None, None, None
        self._owner.closed = True
        params = {id(p): p for p in [*guard.owned_by(self._owner), *model.parameters()]}
        try:
            # Before unmapping: the mapping goes only once no view of it is left (Note [close detaches the model]).
            guard.detach(model, params.values(),
                         "Reconnect for a new model: bridge = ipcbridge.connect(engine); model = bridge.model")
        finally:
            if att is not None:
                att.close()
            self.endpoint.close()

    def __repr__(self) -> str:
        """What the bridge holds, from its own state only: no RPC (a repr must not block on a busy or dead
        engine) and never an exception (reprs run in tracebacks and debuggers, closed bridges included)."""
        def names(dtypes: set[torch.dtype]) -> str:
            return "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))

        try:
            pid = self.manifest.producer.pid
            parts = [f"engine='{self.endpoint.name} (pid {pid})'", f"transport={self.manifest.transport!r}"]
            model = self.model
            if model is not None:
                params = list(model.parameters())
                dtypes = {p.dtype for p in params}
                parts += [f"model={type(model).__name__}", f"{len(params)} parameters",
                          f"{model_weight_bytes(model) / 2**20:.2f} MiB {names(dtypes)}"]
            else:  # closed: the model is gone; describe what the engine exported instead
                specs, config = self.manifest.tensors, self.manifest.config or {}
                if config.get("architectures"):
                    parts.append(f"model={config['architectures'][0]}")
                elif config.get("model_type"):
                    parts.append(f"model_type={config['model_type']!r}")
                parts += [f"{len(specs)} engine tensors",
                          f"{self.manifest.total_bytes() / 2**20:.2f} MiB "
                          f"{names({s.torch_dtype for s in specs})}"]
            parts += [f"weight_version={self._fence.version}", "open" if model is not None else "closed"]
            return f"Bridge({', '.join(parts)})"
        except Exception as e:  # a half-built or damaged bridge still prints
            return f"<Bridge at {id(self):#x} ({type(e).__name__} reading its state)>"

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _judge_parity(report: CheckReport, engine: CanSample, model: nn.Module, prompt: list[int], max_tokens: int,
                  atol: float | None) -> None:
    tokens, engine_lp = engine.sample(prompt, max_tokens)
    hf_lp = sequence_logprobs(model, prompt, tokens)
    diffs = [abs(a - b) for a, b in zip(hf_lp, engine_lp, strict=False)]
    report.logprob_mean_abs_diff = sum(diffs) / len(diffs) if diffs else 0.0
    report.logprob_max_abs_diff = max(diffs, default=0.0)
    report.parity_atol = parity_atol(model) if atol is None else float(atol)
    report.parity_ok = report.logprob_max_abs_diff <= report.parity_atol


def _failures(report: CheckReport) -> str:
    problems = []
    if report.engine_tensors_used != report.engine_tensors:
        problems.append(f"{report.engine_tensors_used}/{report.engine_tensors} engine tensors used")
    if report.parameters_outside_engine:
        problems.append(f"parameters outside the engine's memory: {_first(report.parameters_outside_engine, 8)}")
    if report.parity_ok is False:
        problems.append(f"logprob parity: max |diff| {report.logprob_max_abs_diff:.3g} > atol {report.parity_atol:g}")
    return "; ".join(problems)


def _add_hints(report: CheckReport) -> None:
    """What may be wrong, and the fix (Note [the step guard] says what each signal can see)."""
    if report.unfenced_writes:
        report.hints.append(
            f"{_first(report.unfenced_writes)} were written in place outside `update()` since the last fence (a "
            "step or write outside `with bridge.update():`): the engine's prefix cache may hold KV of the old "
            "weights and its weight version did not move. Do every write inside `with bridge.update():`; an "
            "empty `with bridge.update(): pass` publishes these now"
        )
    if report.parity_ok is False and not report.unfenced_writes:
        report.hints.append(
            f"the engine's logprobs differ from the attached model's by up to {report.logprob_max_abs_diff:.3g}. "
            "A stale prefix cache? Weights written outside `update()` through `.data` (which no version counter "
            "sees) leave KV of the old weights in the engine: `with bridge.update(): pass` drops it. If the "
            "engine computes with other kernels or in lower precision, pass a larger atol to check()"
        )
    if report.parameters_outside_engine:
        report.hints.append(
            "parameters outside the engine's memory were cast, resized, moved or replaced: steps on them never "
            "reach the engine. Reconnect for a fresh model (ipcbridge.connect) and don't cast or resize it"
        )


def connect(target: Any, *, config: Any = None, check: bool = False,
            lease_seconds: float = DEFAULT_LEASE_SECONDS, wait: float = DEFAULT_WAIT_SECONDS,
            kv_reset: str | None = None) -> Bridge:
    """Attach to ``target``'s weights and return a :class:`Bridge`.

    ``target``: a :class:`~ipcbridge.LocalEngine`, a ``vllm.LLM`` or ``AsyncLLM`` started with
    ``worker_extension_cls="ipcbridge.vllm.WorkerExtension"``, the URL of ``vllm serve`` (dev mode), or a
    :class:`Manifest`. ``check=True`` runs :meth:`Bridge.check` and raises if it fails. Each
    ``update()`` holds the engine's pause for at most ``lease_seconds`` (then the engine resumes by
    itself) and waits at most ``wait`` seconds for another holder's pause to end. ``kv_reset`` (vLLM
    targets only): ``"always"`` (the default) drops vLLM's prefix cache at every update; ``"salted"`` skips
    that reset, for engines whose every request carries ``bridge.endpoint.cache_salt()`` (Note [stale KV:
    reset or salt] in :mod:`ipcbridge.vllm.base`).
    """
    check_settings(lease_seconds, wait)  # before anything is attached
    endpoint = resolve_endpoint(target, kv_reset)
    t0 = time.perf_counter()
    try:
        manifest = endpoint.manifest()
        model, attachment = attach_with_attachment(manifest, config)
    except BaseException:
        endpoint.close()
        raise
    bridge = Bridge(endpoint, model, attachment, manifest, lease_seconds=lease_seconds, wait=wait)
    bridge.attach_seconds = time.perf_counter() - t0
    _warn_precision(model)
    if check:
        try:
            bridge.check(raise_on_failure=True)
        except BaseException:
            bridge.close()
            raise
    logger.info("attached %d tensors over %s in %.3fs", len(manifest.tensors), manifest.transport,
                bridge.attach_seconds)
    return bridge


_precision_warned = False


def _warn_precision(model: nn.Module) -> None:
    """Once per process: 16-bit weights stepped directly learn worse than fp32 masters (issue: 2% of bf16
    weights move in one AdamW step at lr 1e-6). A warning, not a log line, so users can filter it."""
    global _precision_warned
    low = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                  if p.dtype in (torch.bfloat16, torch.float16)})
    if not low or _precision_warned:
        return
    _precision_warned = True
    warnings.warn(
        f"the engine serves {'/'.join(low)} weights: an optimizer stepping them directly rounds small updates "
        "away (at lr 1e-5 plain bf16 AdamW applies about half the updates fp32 training does). For training "
        "equal to fp32 master weights, wrap the optimizer: opt = ipcbridge.optim.master_weights(opt, mode=\"remainder\") "
        "(+2 bytes per parameter). Shown once per process",
        PrecisionWarning, stacklevel=3,
    )
