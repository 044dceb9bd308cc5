"""Alias plans derived from the engine's own loader: per HF tensor, the strided view of one engine tensor it is.

A table (:mod:`~ipcbridge.mapping.tables`) says how HF tensors relate to vLLM's by rule; a
:class:`LoaderPlan` says it by fact: vLLM's worker ran its model's ``load_weights`` over recording tensors
(:mod:`ipcbridge.vllm.loader_plan`) and wrote down where each HF tensor's elements landed. Where every
element of an HF tensor landed in one vLLM parameter at ``offset + sum(index * stride)``, the HF tensor *is*
that strided view, with no table. The plan crosses from the worker to the trainer inside the manifest, so it
is a self-validating frozen dataclass with its own format and version.

Ownership: a plan holds names and numbers only. The views :meth:`LoaderPlan.views` makes alias the tensors
passed in (the engine's memory, mapped by :func:`ipcbridge.attach`) and go stale with them.

:func:`table_plan` writes a table's plan in the same terms, which is how the two are cross-checked: a table
that disagrees with the engine's own loader is wrong for that engine.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ipcbridge.errors import ManifestError, MappingError
from ipcbridge.wire import (
    check_dims,
    check_format,
    check_int,
    check_keys,
    check_name,
    check_strides,
    check_type,
)

FORMAT = "ipcbridge.loader_plan"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Landing:
    """HF tensor ``hf`` is ``target``'s elements at ``offset + sum(i_k * stride_k)`` (in elements, counted
    from the target's first element; the target is contiguous)."""

    hf: str
    target: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def __post_init__(self) -> None:
        where = f"loader_plan landing {self.hf!r}"
        check_name(self.hf, f"{where}.hf")
        check_name(self.target, f"{where}.target")
        check_int(self.offset, f"{where}.offset")
        check_dims(self.shape, f"{where}.shape")
        check_dims(self.stride, f"{where}.stride")
        if len(self.shape) != len(self.stride):
            raise ManifestError(f"{where}: shape {list(self.shape)} and stride {list(self.stride)} differ in rank")
        check_strides(self.shape, self.stride, where)  # a trainable view never shares elements

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def end(self) -> int:
        """One past the last element offset the view reaches (``offset`` for an empty view)."""
        if self.numel == 0:
            return self.offset
        return self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True)) + 1

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """The HF tensor as a view of ``t`` (the target); ``MappingError`` if it does not fit inside ``t``."""
        if not t.is_contiguous():
            raise MappingError(
                f"{self.target}: not contiguous (stride {list(t.stride())}), but a loader plan addresses it by "
                "element offset; the engine re-laid the tensor out after the plan was recorded"
            )
        if self.end() > t.numel():
            raise MappingError(
                f"{self.hf}: the loader plan puts it at elements {self.offset}:{self.end()} of {self.target}, which "
                f"has {t.numel()} ({list(t.shape)}); the plan was recorded for another model"
            )
        return t.as_strided(self.shape, self.stride, t.storage_offset() + self.offset)

    def to_dict(self) -> dict[str, Any]:
        return {"hf": self.hf, "target": self.target, "offset": self.offset, "shape": list(self.shape),
                "stride": list(self.stride)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Landing:
        check_keys(d, {"hf", "target", "offset", "shape", "stride"}, set(), where)
        check_type(d["shape"], list, f"{where}.shape")
        check_type(d["stride"], list, f"{where}.stride")
        return cls(hf=d["hf"], target=d["target"], offset=d["offset"], shape=tuple(d["shape"]),
                   stride=tuple(d["stride"]))


@dataclass(frozen=True)
class LoaderPlan:
    """Every HF parameter of one model as a view of the engine's tensors, recorded from its loader.

    ``tied`` maps an HF name to the HF name whose tensor it shares (``lm_head.weight`` ->
    ``model.embed_tokens.weight``); ``source`` says what recorded it (for messages).
    """

    model_type: str
    landings: tuple[Landing, ...]
    tied: Mapping[str, str] = field(default_factory=dict, hash=False)
    source: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        check_name(self.model_type, "loader_plan.model_type")
        check_type(self.source, str, "loader_plan.source")
        check_type(self.landings, tuple, "loader_plan.landings")
        if not self.landings:
            raise ManifestError("loader_plan.landings: empty; a plan maps at least one tensor")
        seen: set[str] = set()
        for la in self.landings:
            check_type(la, Landing, "loader_plan.landings[]")
            if la.hf in seen:
                raise ManifestError(f"loader_plan.landings: {la.hf!r} lands twice")
            seen.add(la.hf)
        check_type(self.tied, Mapping, "loader_plan.tied")
        for name, to in self.tied.items():
            check_name(name, "loader_plan.tied key")
            if name in seen or to not in seen:
                raise ManifestError(
                    f"loader_plan.tied: {name!r} -> {to!r} must tie a tensor without a landing to one with a landing"
                )
        self._check_disjoint()

    def _check_disjoint(self) -> None:
        """Two HF tensors sharing engine elements would each get the other's update; refuse overlapping
        extents (exact for the row blocks loaders make; conservative for interleaved views)."""
        by_target: dict[str, list[Landing]] = {}
        for la in self.landings:
            if la.numel:
                by_target.setdefault(la.target, []).append(la)
        for target, group in by_target.items():
            group.sort(key=lambda la: la.offset)
            for a, b in itertools.pairwise(group):
                if b.offset < a.end():
                    raise ManifestError(f"loader_plan: {a.hf!r} and {b.hf!r} overlap in {target!r}")

    # -- use ------------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [la.hf for la in self.landings] + list(self.tied)

    def by_hf(self) -> dict[str, Landing]:
        return {la.hf: la for la in self.landings}

    def views(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF-named views of ``tensors`` (vLLM names); tied names get the very same tensor object."""
        missing = sorted({la.target for la in self.landings} - tensors.keys())
        if missing:
            raise MappingError(
                f"the loader plan ({self.source or 'derived'}) lands HF tensors in {missing[:4]}, which the engine "
                "did not export; the plan and the manifest come from different models"
            )
        out = {la.hf: la.view(tensors[la.target]) for la in self.landings}
        check_no_shared_memory(out)
        for name, to in self.tied.items():
            out[name] = out[to]
        return out

    # -- serialisation -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": self.format_version, "model_type": self.model_type,
                "source": self.source, "tied": dict(self.tied), "landings": [la.to_dict() for la in self.landings]}

    @classmethod
    def from_dict(cls, d: Any) -> LoaderPlan:
        check_format(d, FORMAT, FORMAT_VERSION, "loader_plan")
        check_keys(d, {"format", "format_version", "model_type", "source", "tied", "landings"}, set(), "loader_plan")
        check_type(d["landings"], list, "loader_plan.landings")
        check_type(d["tied"], Mapping, "loader_plan.tied")
        for k, v in d["tied"].items():
            check_type(v, str, f"loader_plan.tied[{k!r}]")
        landings = tuple(Landing.from_dict(la, f"loader_plan.landings[{i}]") for i, la in enumerate(d["landings"]))
        return cls(model_type=d["model_type"], landings=landings, tied=dict(d["tied"]), source=d["source"],
                   format_version=d["format_version"])


def check_no_shared_memory(views: Mapping[str, torch.Tensor]) -> None:
    """``MappingError`` if two of ``views`` (distinct parameters) share memory, across engine tensors too: a
    manifest may describe two "different" engine tensors over the same bytes, which neither a table nor the
    per-target check of a plan can see. Each would then get the other's update."""
    spans = sorted((v.data_ptr(), v.data_ptr() + span_bytes(v), n) for n, v in views.items() if v.numel())
    for (_, a_end, a), (b_start, _, b) in itertools.pairwise(spans):
        if b_start < a_end:
            raise MappingError(
                f"{a!r} and {b!r} are bound to overlapping engine memory (the manifest's tensors alias each "
                "other), so each would get the other's update; the manifest was not written by the engine's "
                "export, ask the engine for a fresh one"
            )


def span_bytes(v: torch.Tensor) -> int:
    """Bytes from ``v``'s first element to one past its last (non-negative strides; ``v`` has elements)."""
    return (sum((n - 1) * s for n, s in zip(v.shape, v.stride(), strict=True)) + 1) * v.element_size()


def table_plan(vllm_shapes: Mapping[str, Sequence[int]], config: Any) -> LoaderPlan:
    """The plan ``config``'s table gives for vLLM tensors of ``vllm_shapes``, as a :class:`LoaderPlan`.

    Resolved on meta tensors (no memory): each view's offset and strides are what :func:`hf_views` would
    bind, so comparing it to a derived plan compares exactly what ``attach`` does either way.
    """
    from ipcbridge.hf import model_type
    from ipcbridge.mapping.convert import hf_views  # one-way: convert never imports this module
    from ipcbridge.mapping.plan import plan_from_vllm

    metas = {n: torch.empty(tuple(s), device="meta") for n, s in vllm_shapes.items()}
    views = hf_views(metas, config)
    landings, tied = [], {}
    for s in plan_from_vllm(metas, config):
        if s.op == "tied":
            tied[s.hf] = s.tied_to or ""
            continue
        v = views[s.hf]
        landings.append(Landing(hf=s.hf, target=s.target, offset=v.storage_offset(), shape=tuple(v.shape),
                                stride=tuple(v.stride())))
    return LoaderPlan(model_type=model_type(config), landings=tuple(landings), tied=tied, source="table")


def differences(derived: LoaderPlan, table: LoaderPlan) -> list[str]:
    """Where two plans disagree, one line per HF tensor (empty: they bind every tensor identically)."""
    a, b = derived.by_hf(), table.by_hf()
    out = [f"{n}: only the {'derived' if n in a else 'table'} plan maps it" for n in sorted(a.keys() ^ b.keys())]
    for n in sorted(a.keys() & b.keys()):
        if a[n] != b[n]:
            out.append(f"{n}: derived {a[n].target}@{a[n].offset} {list(a[n].shape)}/{list(a[n].stride)}, table "
                       f"{b[n].target}@{b[n].offset} {list(b[n].shape)}/{list(b[n].stride)}")
    if dict(derived.tied) != dict(table.tied):
        out.append(f"tied: derived {dict(derived.tied)}, table {dict(table.tied)}")
    return out
