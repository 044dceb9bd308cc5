"""Applying plans to tensors: views into HF layout, copies into the others, and whole-model conversion.

The same plan runs both ways: ``_to_hf`` applies it other -> HF (views, or the rotary permutation),
``_from_hf`` HF -> other (concatenating, padding, transposing, permuting). :func:`convert` chains them
between any two layouts and checks the state dict is exactly the config's model; :func:`hf_views` and
:func:`to_vllm` are the vLLM shortcuts. Nothing here touches processes or devices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ipcbridge.errors import MappingError
from ipcbridge.hf import build_meta_model, model_type, to_hf_config
from ipcbridge.mapping.plan import (
    LABELS,
    Step,
    check_layouts,
    layout_hint,
    plan_from_hf,
    plan_from_vllm,
    resolve,
)
from ipcbridge.mapping.registry import bound_arch
from ipcbridge.mapping.rotary import permute_rotary, unpermute_rotary
from ipcbridge.mapping.spec import BoundArch

logger = logging.getLogger(__name__)


def _check_rows(step: Step, t: torch.Tensor, total: int, what: str) -> None:
    if t.dim() == 0 or t.shape[0] != total:
        raise MappingError(
            f"{step.target}: expected {total} rows ({what}) from the config, got shape {list(t.shape)}; "
            "is this the weights' own config?"
        )


def _narrow(s: Step, t: torch.Tensor) -> torch.Tensor:
    start, stop, total = s.start or 0, s.stop or 0, s.total or 0  # always set for rows/vocab steps
    _check_rows(s, t, total, "padded vocab" if s.op == "vocab" else f"fused {'|'.join(s.parts)}")
    return t.narrow(0, start, stop - start)


def _transpose(s: Step, t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 2:
        raise MappingError(f"{s.target}: expected a 2-d weight to transpose, got shape {list(t.shape)}")
    return t.t()


# Other layout -> HF, per op: a view for every op but the rotary permutation.
_TO_HF: dict[str, Callable[[Step, torch.Tensor], torch.Tensor]] = {
    "same": lambda s, t: t,
    "rows": _narrow,
    "vocab": _narrow,
    "transpose": _transpose,
    "rotary": lambda s, t: permute_rotary(t, s.heads or 0, s.target),
}


def _to_hf(state_dict: Mapping[str, torch.Tensor], steps: list[Step]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for s in steps:
        if s.op != "tied":
            out[s.hf] = _TO_HF[s.op](s, state_dict[s.target])
    for s in steps:
        if s.op == "tied":
            out[s.hf] = out[s.tied_to]  # the very same tensor object: one Parameter after binding
    return out


def _pad_vocab(s: Step, t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0 or t.shape[0] != s.stop:
        raise MappingError(f"{s.hf}: expected {s.stop} rows (config.vocab_size), got {list(t.shape)}")
    padded = t.new_zeros((s.total, *t.shape[1:]))
    padded[: s.stop] = t
    return padded


# HF -> other layout, per op, for the ops that do not fuse (``rows`` are gathered and concatenated).
_FROM_HF: dict[str, Callable[[Step, torch.Tensor], torch.Tensor]] = {
    "same": lambda s, t: t,
    "vocab": _pad_vocab,
    "transpose": lambda s, t: _transpose(s, t).contiguous(),
    "rotary": lambda s, t: unpermute_rotary(t, s.heads or 0, s.hf),
}


def _fuse(name: str, parts: dict[str, tuple[Step, torch.Tensor]]) -> torch.Tensor:
    order = next(iter(parts.values()))[0].parts
    missing = [p for p in order if p not in parts]
    if missing:
        raise MappingError(
            f"{name}: the HF tensor(s) for part(s) {missing} are missing; all of {list(order)} are needed "
            "to fuse it"
        )
    return torch.cat([parts[p][1] for p in order], dim=0)


def _from_hf(hf_state_dict: Mapping[str, torch.Tensor], steps: list[Step]) -> dict[str, torch.Tensor]:
    fused: dict[str, dict[str, tuple[Step, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for s in steps:
        if s.op == "tied":
            continue
        t = hf_state_dict[s.hf]
        if s.op != "rows":
            out[s.target] = _FROM_HF[s.op](s, t)
            continue
        rows = (s.stop or 0) - (s.start or 0)  # always set for rows steps
        if t.dim() == 0 or t.shape[0] != rows:
            raise MappingError(
                f"{s.hf}: expected {rows} rows (part {s.part!r} of {s.target}) from the config, "
                f"got shape {list(t.shape)}"
            )
        fused.setdefault(s.target, {})[s.part or ""] = (s, t)
    for name, parts in fused.items():
        out[name] = _fuse(name, parts)
    return out


def hf_views(vllm_state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """HF-named zero-copy views of vLLM-layout tensors: row slices, vocab slices, transposes, tied shares.

    The views alias ``vllm_state_dict``'s memory: writing through them writes the vLLM tensors. A tied
    ``lm_head`` is the very same tensor object as the embedding. Raises ``MappingError`` for names or
    shapes that do not fit the config, and if any tensor would need a copy. Checks only the tensors given
    (``attach`` checks they cover the model; :func:`convert` does too).
    """
    steps = plan_from_vllm(vllm_state_dict.keys(), config)
    _refuse_copies(steps, "vllm", "hf")
    views = _to_hf(vllm_state_dict, steps)
    for s in steps:
        view, src = views[s.hf], vllm_state_dict[s.target]
        if view.numel() and view.untyped_storage().data_ptr() != src.untyped_storage().data_ptr():
            raise MappingError(f"{s.hf}: would need a copy of {s.target} ({s.reason}); refusing")
    return views


def to_vllm(hf_state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Build vLLM's exact layout and names from HF tensors (a copy wherever vLLM fuses or pads).

    Fused tensors are ``torch.cat`` of their parts in the table's order (``[q | k | v]``, ``[gate | up]``);
    vocab tensors are zero-padded to the architecture's multiple; a tied ``lm_head`` is dropped. Checks
    only the tensors given, so partial updates work; :func:`convert` also checks they cover the model.
    """
    return _from_hf(hf_state_dict, plan_from_hf(hf_state_dict.keys(), config))


# ---- convert --------------------------------------------------------------------------------------------


def _refuse_copies(steps: list[Step] | None, src: str, dst: str) -> None:
    for s in steps or ():
        if s.kind(src, dst) == "copy":
            a, b = (s.target, s.hf) if dst == "hf" else (s.hf, s.target)
            raise MappingError(
                f"{LABELS[src]} tensor {a!r} -> {LABELS[dst]} {b!r} needs a copy: {s.copy_reason(dst)}. "
                "Zero-copy attaching needs views only: export the engine's weights in the 'vllm' (or 'hf') "
                "layout, or call convert(..., alias_only=False) for copies"
            )


def hf_parameter_shapes(config: Any) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The config's HF model: every parameter name (tied ones too) -> shape, and the names of the
    distinct parameters. Built on the meta device, so it costs no weight memory."""
    model = build_meta_model(to_hf_config(config), torch.float32)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    return shapes, {n for n, _ in model.named_parameters()}


def _check_coverage(produced: dict[str, str], shapes: dict[str, tuple[int, ...]], unique: set[str],
                    arch: BoundArch | None, src: str, mt: str) -> None:
    """``produced``: HF name -> the ``src`` name it comes from. Every distinct HF parameter exactly once.
    ``arch`` is ``src``'s table (None for HF), to name missing tensors in ``src``'s names; ``mt`` the
    config's model type, to guess the layout the names are really in when they do not fit."""
    label = LABELS[src]
    missing = sorted(unique - produced.keys())
    extra = sorted(produced.keys() - shapes.keys())
    if missing or extra:
        hint = layout_hint(produced.values(), mt, src)
        if hint:
            raise MappingError(
                f"{hint} As {label} names, the state dict lacks {len(missing)} and has {len(extra)} unexpected "
                f"tensor(s) for the config's model: e.g. {(missing or extra)[:4]}"
            )
    if missing:
        names = missing
        if arch is not None:
            steps = resolve(missing, arch, "hf")
            names = sorted({s.target for s in steps if s.op != "tied"}) or missing
        raise MappingError(
            f"the {label} state dict lacks {len(names)} tensor(s) the config's model has: {names[:8]}"
            + ("" if src == "hf" else f" (HF {missing[:8]})")
            + ". Pass all of the model's tensors, or the config they were saved with (num_hidden_layers, "
            "biases, tie_word_embeddings)"
        )
    if extra:
        names = sorted({produced[h] for h in extra})
        raise MappingError(
            f"the {label} state dict has {len(names)} tensor(s) the config's model does not: {names[:8]}. "
            "Drop them, or pass the config the weights were saved with (num_hidden_layers, biases, "
            "tie_word_embeddings)"
        )


def _check_shapes(hf: Mapping[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], origin: dict[str, str],
                  src: str) -> None:
    for name, t in hf.items():
        if tuple(t.shape) != shapes[name]:
            where = "" if src == "hf" else f" (from {LABELS[src]} {origin[name]!r})"
            raise MappingError(
                f"{name}{where}: shape {list(t.shape)}, but the config's model has {list(shapes[name])}; "
                "pass the weights' own config"
            )


def convert(state_dict: Mapping[str, torch.Tensor], config: Any, src: str, dst: str,
            alias_only: bool = False) -> dict[str, torch.Tensor]:
    """Convert a full state dict between any two of the ``"hf"``, ``"vllm"`` and ``"meta"`` layouts.

    Non-HF layouts go through HF names (``meta -> hf -> vllm``). Every tensor that can be a view is one
    (vLLM -> HF always is); the others are copies: fusing, padding, transposing into vLLM's layout and the
    rotary permutation between Meta and HF. With ``alias_only=True`` nothing is converted if any tensor
    would need a copy: a ``MappingError`` names the first one and why. The state dict must hold exactly the
    config's model (a tied ``lm_head`` may be present or not in HF layout); errors name the missing or
    unexpected tensors in ``src``'s names.
    """
    check_layouts(src, dst)
    # Each non-HF layout's table, config read once: an unmapped architecture or variant fails here, before
    # any model is built.
    arches = {layout: bound_arch(config, layout) for layout in sorted({src, dst} - {"hf"})}
    names = list(state_dict.keys())
    first = None if src == "hf" else resolve(names, arches[src], src)
    # HF name -> name in src, to report errors in the caller's names.
    origin = {n: n for n in names} if first is None else {s.hf: s.target for s in first}
    shapes, unique = hf_parameter_shapes(config)
    _check_coverage(origin, shapes, unique, arches.get(src), src, model_type(config))
    second = None if dst in ("hf", src) else resolve(list(origin), arches[dst], "hf")
    if alias_only:  # before any tensor is touched
        _refuse_copies(first if dst != src else None, src, "hf")
        _refuse_copies(second, "hf", dst)
    if src == dst:
        return dict(state_dict)
    hf = dict(state_dict) if first is None else _to_hf(state_dict, first)
    _check_shapes(hf, shapes, origin, src)
    if second is None:
        return hf
    return _from_hf(hf, second)
