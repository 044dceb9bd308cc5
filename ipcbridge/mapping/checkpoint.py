"""HF parameters as the checkpoint tensors they are made of: transformers 5's conversion mapping, reversed.

transformers 5.x (5.17 and 5.24 alike, ``transformers/conversion_mapping.py``) loads some checkpoints
through a *conversion mapping*: MoE experts stored one tensor per expert become one fused parameter, and
some modules are renamed. For the MoE models ipcbridge maps:

==========  =====================================================  ============================================
model_type  checkpoint (what vLLM's ``load_weights`` is written for)  HF parameter (transformers 5)
==========  =====================================================  ============================================
qwen2_moe,  ``mlp.experts.{e}.gate_proj.weight`` [I, H],              ``mlp.experts.gate_up_proj`` [E, 2I, H]
qwen3_moe   ``mlp.experts.{e}.up_proj.weight`` [I, H]                 (``MergeModulelist(0)``, ``Concatenate(1)``)
            ``mlp.experts.{e}.down_proj.weight`` [H, I]               ``mlp.experts.down_proj`` [E, H, I]
mixtral     ``block_sparse_moe.experts.{e}.w1/w3.weight``,           ``mlp.experts.gate_up_proj``,
            ``block_sparse_moe.experts.{e}.w2.weight``,              ``mlp.experts.down_proj``,
            ``block_sparse_moe.gate.weight``                          ``mlp.gate.weight`` (``.block_sparse_moe.`` ->
                                                                      ``.mlp.``)
==========  =====================================================  ============================================

:func:`checkpoint_rules` reads that mapping once into data (:class:`Renaming`, :class:`Fusion`) and
:func:`checkpoint_views` applies it backwards: an HF tensor -> ``(checkpoint name, view of it)`` pairs, made
by ``chunk`` and ``unbind`` only, so each checkpoint tensor *is* part of the HF tensor. Driving vLLM's loader
with those views is how a derived plan composes per-expert landings into the fused parameter's one landing
(a whole-tensor alias of ``w13_weight``/``w2_weight``).

Operations other than ``MergeModulelist`` and ``Concatenate``, and renamings that are not plain substrings,
cannot be reversed into views here: they are kept as :class:`Unsupported` and refused, naming the rule,
for exactly the HF tensors they apply to.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ipcbridge.errors import MappingError

#: What a regex pattern may hold and still be a plain substring (escaped dots).
_PLAIN = re.compile(r"^(?:[A-Za-z0-9_*]|\\\.|\.)+$")


@dataclass(frozen=True)
class Renaming:
    """Checkpoint substring ``source`` is HF substring ``target``."""

    source: str
    target: str


@dataclass(frozen=True)
class Fusion:
    """Checkpoint tensors ``sources`` (``*`` is the expert index) stacked along ``stack_dim`` per source,
    then concatenated along ``cat_dim`` (``None``: one source, no concatenation) make HF tensor ``target``."""

    sources: tuple[str, ...]
    target: str
    stack_dim: int
    cat_dim: int | None


@dataclass(frozen=True)
class Unsupported:
    """A conversion this module cannot reverse into views; refused for the HF tensors ``target`` matches."""

    target: str
    what: str


Rule = Renaming | Fusion | Unsupported


def _plain(pattern: str) -> str | None:
    return pattern.replace("\\.", ".") if _PLAIN.match(pattern) else None


def _patterns(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _rule(transform: Any) -> Rule:
    """One transformers ``WeightRenaming``/``WeightConverter`` as data (duck-typed: attribute names of 5.x)."""
    sources, targets = _patterns(transform.source_patterns), _patterns(transform.target_patterns)
    ops = list(getattr(transform, "operations", None) or [])
    described = f"{type(transform).__name__}({sources} -> {targets}, {[type(o).__name__ for o in ops]})"
    plain = [_plain(p) for p in (*sources, *targets)]
    if len(targets) != 1 or None in plain:
        return Unsupported(target=targets[0] if targets else "", what=described)
    srcs, target = tuple(p or "" for p in plain[:-1]), plain[-1] or ""
    if not ops:
        return Renaming(source=srcs[0], target=target) if len(srcs) == 1 else Unsupported(target, described)
    kinds = [type(o).__name__ for o in ops]
    if kinds[0] != "MergeModulelist" or kinds[1:] not in ([], ["Concatenate"]) or (len(kinds) == 1) != (len(srcs) == 1):
        return Unsupported(target=target, what=described)
    if any(s.count("*") != 1 for s in srcs):
        return Unsupported(target=target, what=described)
    return Fusion(sources=srcs, target=target, stack_dim=int(ops[0].dim),
                  cat_dim=int(ops[1].dim) if len(ops) > 1 else None)


def checkpoint_rules(model_type: str) -> tuple[Rule, ...]:
    """transformers' conversion mapping for ``model_type`` as data; ``()`` when it has none (dense models,
    transformers 4.x, which keeps checkpoint names). Only the model type's own mapping: transformers' global
    "legacy" renames (``LayerNorm.gamma`` -> ``.weight``) describe old checkpoints, not vLLM's loaders."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return ()
    return tuple(_rule(t) for t in get_checkpoint_conversion_mapping(model_type) or ())


def _fused_views(name: str, t: torch.Tensor, f: Fusion, prefix: str) -> list[tuple[str, torch.Tensor]]:
    parts = t.chunk(len(f.sources), dim=f.cat_dim) if f.cat_dim is not None else (t,)
    if f.cat_dim is not None and any(p.shape[f.cat_dim] * len(f.sources) != t.shape[f.cat_dim] for p in parts):
        raise MappingError(f"{name}: dimension {f.cat_dim} ({t.shape[f.cat_dim]}) does not split into "
                           f"{len(f.sources)} equal checkpoint tensors {list(f.sources)}")
    return [(prefix + source.replace("*", str(e)), expert)
            for source, part in zip(f.sources, parts, strict=True) for e, expert in enumerate(part.unbind(f.stack_dim))]


def _rename(name: str, rules: Sequence[Rule]) -> str:
    for r in rules:
        if isinstance(r, Renaming):
            name = name.replace(r.target, r.source)
    return name


def checkpoint_views(name: str, t: torch.Tensor, rules: Sequence[Rule]) -> list[tuple[str, torch.Tensor]]:
    """HF tensor ``name`` as ``(checkpoint name, view of t)`` pairs: ``[(name, t)]`` when no rule fuses it.

    The views are ``chunk``/``unbind`` of ``t`` (they alias it and share its autograd history). Raises
    ``MappingError`` where an :class:`Unsupported` rule applies to ``name``.
    """
    for r in rules:
        if isinstance(r, Unsupported) and r.target and re.search(r.target, name):
            raise MappingError(
                f"{name}: transformers builds it from checkpoint tensors with {r.what}, which ipcbridge cannot "
                "express as views of it, so vLLM's loader cannot be driven with its checkpoint names; register "
                "a table for this architecture (ipcbridge.mapping.register)"
            )
    for r in rules:
        if isinstance(r, Fusion):
            prefix, found, rest = name.partition(r.target)
            if found and not rest:
                return [(_rename(n, rules), v) for n, v in _fused_views(name, t, r, prefix)]
    return [(_rename(name, rules), t)]
