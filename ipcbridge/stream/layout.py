"""What a trainer's HF model must match to stream into an engine: the engine's tensors seen under HF names.

An engine announces its tensors in its own ('vllm') layout; :func:`engine_layout` reads them, through the
mapping tables, as the HF parameters the trainer must hold (names, shapes, dtypes, ties, and which engine
tensors have rows no HF tensor covers). :func:`check_fits` holds a model against that, and
:func:`fits_engine` does both for a peer's announced tensors before anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ipcbridge import mapping
from ipcbridge.errors import BridgeError, MappingError
from ipcbridge.stream.plan import StreamPlan, plan_buckets


@dataclass(frozen=True)
class Layout:
    """The trainer's HF parameters that the engine's plan takes, derived once from the plan."""

    #: HF name -> (shape, dtype), tied names included.
    params: dict[str, tuple[tuple[int, ...], torch.dtype]]
    #: (tied name, the name whose tensor it must be).
    tied: tuple[tuple[str, str], ...]
    #: Engine tensors not fully covered by HF tensors (vocab padding): zeroed before packing.
    zero: frozenset[str]


def engine_layout(plan: StreamPlan, config: Any) -> Layout:
    """The HF parameters (under ``config``'s architecture) that ``plan``'s engine tensors take."""
    meta = {s.name: torch.empty(s.shape, dtype=s.torch_dtype, device="meta") for s in plan.slots}
    try:
        views = mapping.hf_views(meta, config)
        steps = mapping.plan_from_vllm(meta.keys(), config)
    except MappingError as e:
        raise BridgeError(
            f"the trainer's model does not fit the engine's weights: {e} Fix: stream the model the engine serves "
            "(same architecture and config)"
        ) from None
    covered = dict.fromkeys(meta, 0)
    tied = []
    for s in steps:
        if s.op == "tied":
            tied.append((s.hf, s.tied_to or ""))
        else:
            covered[s.target] += views[s.hf].numel()
    return Layout(
        params={n: (tuple(v.shape), v.dtype) for n, v in views.items()},
        tied=tuple(tied),
        zero=frozenset(n for n, t in meta.items() if covered[n] < t.numel()),
    )


def check_fits(layout: Layout, params: dict[str, torch.Tensor]) -> None:
    """``BridgeError`` unless ``params`` (a model's, by HF name) fit ``layout``: names, shapes, dtypes, ties."""
    expected = layout.params
    missing = sorted(expected.keys() - params.keys())
    extra = sorted(params.keys() - expected.keys())
    if missing or extra:
        raise BridgeError(
            f"the trainer's model no longer matches the engine's weights: missing {missing[:8]}, not in the "
            f"engine {extra[:8]}. Fix: stream the model the engine serves (same config), and do not add or "
            "remove parameters after ipcbridge.stream()"
        )
    for name, (shape, dtype) in expected.items():
        p = params[name]
        if tuple(p.shape) != shape or p.dtype != dtype:
            raise BridgeError(
                f"{name}: the trainer's model has {p.dtype} {list(p.shape)}, the engine's weights take "
                f"{dtype} {list(shape)}. Fix: keep the model's shapes and dtypes (no resize_token_embeddings; "
                f"after a cast, model.to({dtype})), or restart the engine with the new model and open a new "
                "stream"
            )
    for name, target in layout.tied:
        if params[name] is not params[target]:
            raise BridgeError(
                f"the engine ties {name} to {target}, but the trainer's model has two separate tensors, and "
                f"the engine would never see {name}'s updates. Fix: model.tie_weights() (or start the "
                "engine with tie_word_embeddings=False)"
            )


def fits_engine(specs: list[tuple[str, Any, Any]], model: nn.Module) -> None:
    """``BridgeError`` unless ``model`` fits an engine whose tensors are ``specs`` ((name, dtype, shape) in the
    'vllm' layout), checked on the trainer before anything is sent."""
    check_fits(engine_layout(plan_buckets(specs), model.config), dict(model.named_parameters(remove_duplicate=False)))
