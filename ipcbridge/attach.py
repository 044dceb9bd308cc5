"""Attach: a Hugging Face model whose parameters are views of an engine's weight memory.

The model is built with its parameters on the meta device (no weight memory at all; accelerate's
``init_empty_weights``, see Note [building on the meta device] in :mod:`ipcbridge.hf`), then every
parameter is *assigned* a view of the engine's tensors, by core torch's ``Module.__setattr__`` (Note [binding by
setattr]), which patches nothing. Tied parameters receive the very same ``nn.Parameter`` object, so an optimizer
updates them once.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ipcbridge import mapping
from ipcbridge.errors import BridgeError, MappingError
from ipcbridge.handles import OpenedManifest, open_manifest
from ipcbridge.hf import build_meta_model, materialize_buffers, to_hf_config
from ipcbridge.manifest import Manifest
from ipcbridge.mapping.derived import check_no_shared_memory, span_bytes

logger = logging.getLogger(__name__)


@dataclass
class Attachment:
    """What an attached model aliases. Owned by the :class:`~ipcbridge.Bridge` (nothing is stored on the model).

    ``ranges`` are the (start, end) addresses of the engine's storages as mapped here: every parameter's
    bytes must lie inside one of them (the zero-copy proof). ``opened`` keeps the mappings alive.
    """

    layout: str
    ranges: list[tuple[int, int]]
    source_tensors: dict[str, torch.Tensor] = field(repr=False)
    opened: OpenedManifest | None = field(default=None, repr=False)
    #: ``ranges`` sorted by start, and the largest end among each prefix: Note [ranges by bisection].
    _starts: list[int] = field(init=False, repr=False)
    _reach: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ordered = sorted(self.ranges)
        self._starts = [lo for lo, _ in ordered]
        self._reach = list(itertools.accumulate((hi for _, hi in ordered), max))

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s bytes lie inside one of ``ranges`` (a tensor without elements always does)."""
        if t.numel() == 0:
            return True
        start = t.data_ptr()
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and start + span_bytes(t) <= self._reach[i]

    def outside(self, model: nn.Module) -> list[str]:
        """The names of ``model``'s parameters whose bytes do not lie in the engine's memory: copied,
        resized (Note [IPC tensors must never be resized]) or moved. Empty when fully aliased."""
        return [n for n, p in model.named_parameters(remove_duplicate=False) if not self.owns(p)]

    def tensors_used(self, model: nn.Module) -> set[str]:
        """Names of the engine tensors that ``model``'s parameters lie in, read from the addresses: the same
        answer whichever plan bound them (a table, the loader's derived plan, or none)."""
        spans = sorted((t.data_ptr(), t.data_ptr() + span_bytes(t), n)
                       for n, t in self.source_tensors.items() if t.numel())
        starts = [lo for lo, _, _ in spans]
        used = set()
        for p in model.parameters():
            i = bisect.bisect_right(starts, p.data_ptr()) - 1
            if p.numel() and i >= 0 and p.data_ptr() < spans[i][1]:
                used.add(spans[i][2])
        return used

    def outside_bytes(self, model: nn.Module) -> int:
        """Bytes of ``model``'s distinct parameters outside the engine's memory (0 when fully aliased)."""
        return sum(p.numel() * p.element_size() for p in model.parameters() if not self.owns(p))

    def close(self) -> None:
        """Unmap the engine's memory (the model's views must be dropped too for it to go)."""
        self.source_tensors.clear()
        if self.opened is not None:
            self.opened.close()


# Note [ranges by bisection]
#     ``owns`` runs for every parameter against every storage: 291 x 195 comparisons in Python for the
#     Llama-3-8B shape, a millisecond per check. A tensor lies inside one of the ranges exactly when some
#     range starting at or before it ends at or after it, i.e. when the largest end among the ranges that
#     start at or before it reaches its end. So the ranges are sorted once and each check is one bisection;
#     ranges may overlap or nest (storages of one CUDA segment, or a hostile manifest) without changing
#     the answer, which is the same "inside one range" test as before, never "inside their union".


# Note [binding by setattr]
#     ``load_state_dict(assign=True)`` ends, per parameter, in ``setattr(module, name, Parameter(view))``;
#     around that it walks all 423 modules of the 8B shape twice (state-dict prefixes, then hooks and
#     missing keys), a third of the binding's time. ``bind`` does the setattr itself, through core
#     torch's ``Module.__setattr__`` (which registers a Parameter), after checking the very things
#     ``load_state_dict`` would: every name of the model is bound, none is unknown, every shape matches.
#     :func:`verify` then checks what neither can: that no parameter is left on the meta device (a module
#     whose ``__setattr__`` did not register it), and that each one is the view it was given.


def bind(model: nn.Module, views: Mapping[str, torch.Tensor]) -> None:
    """Assign ``views`` as the parameters of ``model`` (a meta model), sharing Parameters between ties."""
    expected = dict(model.named_parameters(remove_duplicate=False))
    missing = sorted(expected.keys() - views.keys())
    extra = sorted(views.keys() - expected.keys())
    if missing or extra:
        raise MappingError(
            "the engine's tensors do not cover the HF model exactly: "
            + (f"missing {missing[:8]}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {extra[:8]}" if extra else "")
            + ". Use the engine's own config (same layers, heads, biases and tie_word_embeddings)"
        )
    for name, p in expected.items():
        v = views[name]
        if tuple(v.shape) != tuple(p.shape):
            raise MappingError(f"{name}: the engine's view has shape {list(v.shape)}, the HF model wants {list(p.shape)}")
    _check_ties(expected, views)
    # Note [binding by setattr]: what load_state_dict(assign=True) does per parameter, without its walk.
    modules = dict(model.named_modules(remove_duplicate=False))
    params: dict[int, nn.Parameter] = {}
    for name, v in views.items():
        # One Parameter per distinct tensor object: a tied lm_head gets the embedding's Parameter.
        if id(v) not in params:
            params[id(v)] = nn.Parameter(v, requires_grad=expected[name].requires_grad)
        owner, _, leaf = name.rpartition(".")
        setattr(modules[owner], leaf, params[id(v)])


def _check_ties(expected: Mapping[str, nn.Parameter], views: Mapping[str, torch.Tensor]) -> None:
    """Names given one tensor must be one Parameter of the HF model too: a peer's plan that ties q_proj to
    o_proj would otherwise train a model the engine does not serve."""
    first: dict[int, str] = {}
    for name, v in views.items():
        other = first.setdefault(id(v), name)
        if expected[other] is not expected[name]:
            raise MappingError(
                f"{name} and {other} are given the same engine tensor, but the HF model does not tie them; the "
                "engine's plan or config disagrees with this model (use the engine's own config)"
            )


def verify(model: nn.Module, attachment: Attachment, views: Mapping[str, torch.Tensor]) -> None:
    """No parameter on meta, every parameter inside an exported storage, dtypes and shapes as exported, no
    two distinct parameters over the same bytes.

    One walk over the parameters (tied ones under each of their names), as :meth:`Attachment.outside`'s.
    """
    outside, distinct = [], {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.is_meta:
            raise BridgeError(f"{name} is still on the meta device after attach")
        v = views[name]
        if p.dtype != v.dtype or p.shape != v.shape:
            raise BridgeError(f"{name}: bound as {p.dtype}{list(p.shape)}, exported {v.dtype}{list(v.shape)}")
        if not attachment.owns(p):
            outside.append(name)
        distinct.setdefault(id(p), (name, p))
    # Tied names are one Parameter; any two distinct ones must not share a byte, whichever path bound them.
    check_no_shared_memory(dict(distinct.values()))
    if outside:
        raise BridgeError(
            f"{outside[:8]} do not lie in the engine's memory (copied or resized); see Note [IPC tensors must "
            "never be resized]"
        )


def attach(source: Manifest | Mapping[str, torch.Tensor], config: Any = None) -> nn.Module:
    """A ``transformers`` model whose parameters are views of ``source``'s memory.

    ``source`` is a :class:`Manifest` (another process's weights) or an in-process vLLM-layout state dict.
    ``config`` defaults to the manifest's. Training the returned model (``optimizer.step()``) writes the
    engine's tensors in place; the mapping lasts as long as the model's parameters. If anything fails,
    nothing stays attached or mapped. ``ipcbridge.connect`` adds the fence and the self-test.
    """
    return attach_with_attachment(source, config)[0]


def attach_with_attachment(source: Manifest | Mapping[str, torch.Tensor],
                           config: Any = None) -> tuple[nn.Module, Attachment]:
    """:func:`attach`, also returning the :class:`Attachment` that says which memory the model aliases."""
    opened: OpenedManifest | None = None
    plan = None
    if isinstance(source, Manifest):
        plan = source.loader_plan
        config = config if config is not None else source.config
        if config is None:
            raise MappingError("the manifest carries no HF config; pass config=... to attach()")
        layout = source.layout
        opened = open_manifest(source)
        tensors = opened.tensors
        ranges = opened.ranges()
    elif isinstance(source, Mapping):
        if config is None:
            raise MappingError("attach(state_dict) needs config=... (the HF config of the weights)")
        layout, tensors = "vllm", dict(source)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors.values()}
        ranges = [(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in storages.values()]
    else:
        raise TypeError(f"attach() takes a Manifest or a vLLM-layout state dict, got {type(source).__name__}")
    try:
        hf_config = to_hf_config(config)
        views = _views(tensors, hf_config, layout, plan)
        dtypes = {v.dtype for v in views.values()}
        if len(dtypes) != 1:
            logger.info("engine tensors have mixed dtypes %s; building the model in the first", dtypes)
        dtype = next(iter(views.values())).dtype
        model = build_meta_model(hf_config, dtype)
        bind(model, views)
        materialize_buffers(model, next(iter(views.values())).device)
        attachment = Attachment(
            layout=layout, ranges=ranges, source_tensors=tensors, opened=opened,
        )
        verify(model, attachment, views)
    except BaseException:
        if opened is not None:
            opened.close()
        raise
    model.eval()
    return model, attachment


def _views(tensors: Mapping[str, torch.Tensor], config: Any, layout: str,
           loader_plan: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    if layout == "vllm":
        return vllm_views(tensors, config, loader_plan)
    if layout == "hf":
        return dict(tensors)
    return mapping.convert(tensors, config, src=layout, dst="hf", alias_only=True)


def vllm_views(tensors: Mapping[str, torch.Tensor], config: Any,
               loader_plan: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """HF views of vLLM-layout tensors: by the architecture's table where there is one (the fast, audited
    path), else by the plan the worker derived from vLLM's loader. With both, they must agree: a table
    that disagrees with the engine's own loader is wrong for that engine, and binding it would train
    the wrong elements."""
    from ipcbridge.mapping.derived import LoaderPlan, differences, table_plan

    if loader_plan is None:
        return mapping.hf_views(tensors, config)
    plan = LoaderPlan.from_dict(loader_plan)
    if not mapping.has_table(config):
        return plan.views(tensors)
    diff = differences(plan, table_plan({n: tuple(t.shape) for n, t in tensors.items()}, config))
    if diff:
        raise MappingError(
            f"the {plan.model_type!r} table disagrees with the plan derived from the engine's loader "
            f"({plan.source}) on {len(diff)} tensor(s): {diff[:3]}. The table is stale for this vLLM; "
            "unregister it or report it"
        )
    return mapping.hf_views(tensors, config)
