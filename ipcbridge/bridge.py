"""connect(): attach to an engine and fence weight updates against its generation.

A :class:`Bridge` pairs an attached HF model with an :class:`Endpoint`, the engine-specific control
channel (the embedded engine, vLLM's ``LLM``/``AsyncLLM``, or a ``vllm serve`` URL). Endpoints are found
lazily by module path so that ``import ipcbridge`` never imports vLLM.

Note [the fence]
    ``with bridge.update(): optimizer.step()``:
      1. ``endpoint.pause()`` returns once the engine has stopped scheduling and no generation is in
         flight, so nothing reads the weights while they change;
      2. the step runs (it only *enqueues* kernels on the trainer's stream);
      3. the trainer's device work is synchronised, so every write has landed in the shared memory;
      4. ``endpoint.resume(version)`` drops KV/prefix caches computed with the old weights, records the
         new weight version and lets generation continue.
    Without step 3 the engine could resume while the optimizer's kernels are still writing. If the block
    raises, the fence still completes (weights may be partly updated, and the engine must not stay
    paused), and the exception propagates.
"""

from __future__ import annotations

import importlib
import logging
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ipcbridge.attach import attach
from ipcbridge.errors import BridgeError
from ipcbridge.manifest import Manifest

logger = logging.getLogger(__name__)


@runtime_checkable
class Endpoint(Protocol):
    """The control channel of one engine, as ``connect`` needs it.

    An endpoint may also have ``sample(prompt, max_tokens) -> (tokens, logprobs)``: greedy tokens and the
    engine's logprob of each. :meth:`Bridge.check` uses it for the parity test when it is there.
    """

    #: Short description for logs and summaries, e.g. ``"local-engine"`` or ``"vllm-llm"``.
    name: str

    def manifest(self) -> Manifest:
        """The engine's current export (handles, config, weight version)."""

    def pause(self) -> None:
        """Stop generation and wait for in-flight requests. Raise ``BridgeError`` if the engine is gone."""

    def resume(self, weight_version: int) -> None:
        """Drop caches computed with old weights, record ``weight_version``, resume generation."""

    def close(self) -> None:
        """Release the endpoint's own resources (not the engine)."""


#: Endpoint factories by target kind, as "module:attribute" strings (imported on first use).
ENDPOINTS: dict[str, str] = {
    "http": "ipcbridge.vllm.http:HttpEndpoint",
    "vllm": "ipcbridge.vllm.endpoints:endpoint_for",
}


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


class ManifestEndpoint:
    """A fixed manifest with no engine to pause: the fence is only the device synchronisation."""

    name = "manifest"

    def __init__(self, manifest: Manifest) -> None:
        self._manifest = manifest

    def manifest(self) -> Manifest:
        return self._manifest

    def pause(self) -> None:
        pass

    def resume(self, weight_version: int) -> None:
        pass

    def close(self) -> None:
        pass


def resolve_endpoint(target: Any) -> Endpoint:
    """The endpoint for ``target``: a Manifest, a LocalEngine, a vLLM LLM/AsyncLLM, or an http(s) URL."""
    if isinstance(target, Manifest):
        return ManifestEndpoint(target)
    hook = getattr(target, "ipcbridge_endpoint", None)
    if callable(hook):
        return hook()
    if isinstance(target, Endpoint):
        return target
    if isinstance(target, str) and target.startswith(("http://", "https://")):
        return _load(ENDPOINTS["http"])(target)
    if type(target).__module__.split(".")[0] == "vllm":
        return _load(ENDPOINTS["vllm"])(target)
    raise TypeError(
        f"connect() does not know how to reach a {type(target).__module__}.{type(target).__name__}; pass a "
        "LocalEngine, a vllm.LLM/AsyncLLM started with worker_extension_cls='ipcbridge.vllm.WorkerExtension', "
        "an http://host:port of `vllm serve`, or a Manifest"
    )


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


def trainer_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters that do *not* lie in the engine's memory (0 when fully aliased)."""
    att = model.ipcbridge_attachment
    return sum(p.numel() * p.element_size() for p in model.parameters() if not att.owns(p))


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameters (a tied weight counts once, as ``parameters()`` yields it)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def synchronize(model: nn.Module) -> None:
    """Wait for all device work that may write the model's parameters. See Note [the fence] step 3."""
    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    for d in devices:
        torch.cuda.synchronize(d)


class Bridge:
    """An attached HF model plus the engine it aliases.

    ``model``'s parameters are views of the engine's weights: an optimizer step on them *is* a weight
    update. Do it inside ``with bridge.update():`` so the engine never generates from half-written weights.
    """

    def __init__(self, endpoint: Endpoint, model: nn.Module, manifest: Manifest) -> None:
        self.endpoint = endpoint
        self.model: nn.Module | None = model
        self.manifest = manifest
        self.weight_version = manifest.weight_version
        self.fence_seconds: list[float] = []
        self.attach_seconds: float = 0.0

    @property
    def transport(self) -> str:
        return self.manifest.transport

    def _model(self) -> nn.Module:
        if self.model is None:
            raise BridgeError("this Bridge is closed; call ipcbridge.connect(...) again")
        return self.model

    @contextmanager
    def update(self) -> Iterator[Bridge]:
        """Fence a weight update; see Note [the fence]."""
        model = self._model()
        t0 = time.perf_counter()
        self.endpoint.pause()
        paused = time.perf_counter() - t0
        try:
            yield self
        finally:
            t1 = time.perf_counter()
            synchronize(model)
            self.weight_version += 1
            self.endpoint.resume(self.weight_version)
            self.fence_seconds.append(paused + time.perf_counter() - t1)

    def fence_seconds_median(self) -> float | None:
        return statistics.median(self.fence_seconds) if self.fence_seconds else None

    def check(self, prompt: list[int] | None = None, max_tokens: int = 8, raise_on_failure: bool = True) -> CheckReport:
        """Coverage, zero copy and (if the endpoint can sample) logprob parity with the engine."""
        model = self._model()
        att = model.ipcbridge_attachment
        from ipcbridge import mapping

        engine_names = set(att.source_tensors)
        if att.layout == "vllm":
            used = {s.vllm for s in mapping.plan_from_vllm(engine_names, model.config)}
        else:
            used = engine_names
        outside = [n for n, p in model.named_parameters(remove_duplicate=False) if not att.owns(p)]
        report = CheckReport(
            hf_parameters=len(list(model.named_parameters(remove_duplicate=False))),
            engine_tensors=len(engine_names),
            engine_tensors_used=len(used & engine_names),
            parameters_outside_engine=outside,
            trainer_weight_bytes=trainer_weight_bytes(model),
            model_weight_bytes=model_weight_bytes(model),
        )
        sample = getattr(self.endpoint, "sample", None)
        if callable(sample):
            prompt = prompt or [1, 2, 3, 4]
            tokens, engine_lp = sample(prompt, max_tokens)
            hf_lp = sequence_logprobs(model, prompt, tokens)
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

    def close(self) -> None:
        """Drop the model's views and the endpoint. The engine itself keeps running."""
        if self.model is None:
            return
        att = getattr(self.model, "ipcbridge_attachment", None)
        self.model = None
        if att is not None and att.opened is not None:
            att.opened.close()
        self.endpoint.close()

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@torch.no_grad()
def sequence_logprobs(model: nn.Module, prompt: list[int], completion: list[int]) -> list[float]:
    """log p(completion[i] | prompt + completion[:i]) under ``model``, in float32."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + completion], device=device)
    logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(1, torch.tensor(completion, device=device)[:, None])[:, 0].tolist()


@torch.no_grad()
def greedy(model: nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """``max_tokens`` greedy tokens after ``prompt`` under ``model`` (full recompute per token, no cache):
    what an engine serving the same weights should generate."""
    device = next(model.parameters()).device
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(model(torch.tensor([ids], device=device)).logits[0, -1].float().argmax()))
    return ids[len(prompt):]


def connect(target: Any, *, config: Any = None, check: bool = False) -> Bridge:
    """Attach to ``target``'s weights and return a :class:`Bridge`.

    ``target``: a :class:`~ipcbridge.LocalEngine`, a ``vllm.LLM`` or ``AsyncLLM`` started with
    ``worker_extension_cls="ipcbridge.vllm.WorkerExtension"``, the URL of ``vllm serve`` (dev mode), or a
    :class:`Manifest`. ``check=True`` runs :meth:`Bridge.check` and raises if it fails.
    """
    endpoint = resolve_endpoint(target)
    t0 = time.perf_counter()
    manifest = endpoint.manifest()
    model = attach(manifest, config)
    bridge = Bridge(endpoint, model, manifest)
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
