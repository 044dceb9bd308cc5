"""Plans: every tensor name resolved against a table into a :class:`Step`, one per HF tensor.

A step says how the HF tensor relates to the other layout's tensor and whether each direction is an alias
or a copy. :func:`resolve` is the one function that reads a table, in either direction: a table maps HF
templates to target templates, and resolving target names matches the same entries by their target
template, so the inverse is derived from the table rather than kept as a second table that could drift
(as torchtune's ``convert_weights`` derives its inverse). The config is read once per plan, into a
:class:`~ipcbridge.mapping.spec.BoundArch`. Nothing here touches tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from ipcbridge.errors import MappingError
from ipcbridge.mapping.registry import LAYOUTS, bound_arch, specs_for
from ipcbridge.mapping.spec import BoundArch, Rotary, Rows, Rule, Vocab

Kind = Literal["alias", "copy"]
LABELS = {"hf": "HF", "vllm": "vLLM", "meta": "Meta"}


@dataclass(frozen=True)
class Step:
    """How one HF tensor relates to one tensor of another layout (``layout``, vLLM unless a Meta plan).

    ``target`` is the tensor's name in ``layout``. ``start:stop`` are the rows of that tensor the HF tensor
    occupies (for ``rows`` and ``vocab``); ``tied_to`` names the HF tensor a tied one shares (``lm_head`` ->
    embedding); ``heads`` is the head count a ``rotary`` permutation groups rows by.
    """

    hf: str
    target: str
    op: str
    start: int | None = None
    stop: int | None = None
    #: Rows of the whole target tensor (fused or padded), to validate shapes.
    total: int | None = None
    part: str | None = None
    parts: tuple[str, ...] = ()
    tied_to: str | None = None
    #: Building the other layout's tensor from HF ones needs a copy (fusing, padding, transposing, permuting).
    copy_to_target: bool = False
    #: The HF tensor needs a copy of the other layout's tensor (the rotary permutation).
    copy_to_hf: bool = False
    heads: int | None = None
    layout: str = "vllm"

    def kind(self, src: str | None = None, dst: str = "hf") -> Kind:
        """``alias`` if ``dst`` can be a view of ``src`` for this tensor, else ``copy``.

        ``src`` defaults to the step's layout; one of ``src``/``dst`` must be ``"hf"``, the other the layout.
        """
        src = self.layout if src is None else src
        if {src, dst} != {"hf", self.layout}:
            raise MappingError(
                f"{self.hf}: this step maps 'hf' <-> {self.layout!r}, not {src!r} -> {dst!r}; plan each hop"
            )
        if self.op in ("same", "tied"):
            return "alias"
        return "copy" if (self.copy_to_hf if dst == "hf" else self.copy_to_target) else "alias"

    @property
    def reason(self) -> str:
        return {
            "same": "same tensor",
            "tied": f"tied to {self.tied_to}",
            "rows": f"rows {self.start}:{self.stop} of fused {self.target}",
            "vocab": f"rows :{self.stop} of {self.target} (vocab padding dropped)",
            "transpose": f"transpose of {self.target}",
            "rotary": f"{self.target} with Meta's interleaved rotary pairs regrouped into HF's half-split "
            f"layout ({self.heads} heads)",
        }.get(self.op, self.op)

    def copy_reason(self, dst: str) -> str:
        """Why the ``dst`` side of this step cannot be a view (for error messages)."""
        if self.op == "rotary":
            return ("the rotary permutation (view(n_heads, head_dim/2, 2, in).transpose(1, 2)) reorders rows "
                    "within each head, which no strided view can express")
        if dst == "hf":
            return self.reason
        return {
            "rows": f"{self.target} fuses {'|'.join(self.parts)}: building it concatenates them",
            "vocab": f"{self.target} is padded to {self.total} rows",
            "transpose": f"{self.target} is the contiguous transpose of {self.hf}",
        }.get(self.op, self.reason)


@cache
def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


def _entries(arch: BoundArch, name: str, from_hf: bool) -> Iterator[tuple[str, str, Rule]]:
    """(HF name, target name, rule) of every table entry ``name`` instantiates, matched by the entry's HF
    template when ``from_hf``, else by its target template (one fused target matches several entries)."""
    for hf_t, rule in arch.spec.params.items():
        target_t = hf_t if rule.target is None else rule.target
        m = _pattern(hf_t if from_hf else target_t).match(name)
        if m is not None:
            yield hf_t.format(*m.groups()), target_t.format(*m.groups()), rule


def _step(arch: BoundArch, hf: str, target: str, rule: Rule) -> Step:
    start = stop = total = heads = None
    if isinstance(rule, (Rows, Vocab)):
        start, stop, total = arch.rows(rule)
    if isinstance(rule, Rotary):
        heads = arch.heads(rule)
    part, parts = (rule.part, rule.parts) if isinstance(rule, Rows) else (None, ())
    return Step(hf=hf, target=target, op=rule.op, start=start, stop=stop, total=total, part=part,
                parts=parts, copy_to_target=rule.copy_to_target, copy_to_hf=rule.copy_to_hf, heads=heads,
                layout=arch.layout)


def _tied_steps(arch: BoundArch, steps: list[Step]) -> list[Step]:
    by_hf = {s.hf: s for s in steps}
    out = []
    for name, tied_to in arch.spec.tied.items():
        if tied_to in by_hf:
            t = by_hf[tied_to]
            out.append(Step(hf=name, target=t.target, op="tied", start=t.start, stop=t.stop, total=t.total,
                            tied_to=tied_to, layout=t.layout))
    return out


def layout_fits(names: Iterable[str], model_type: str) -> dict[str, list[str]]:
    """Per layout (``hf``, and each layout with a table for ``model_type``), the ``names`` its table
    templates instantiate. Pure and table-driven; error paths only (it matches every name against every
    template), to guess which layout a state dict is really in."""
    templates: dict[str, set[str]] = {"hf": set()}
    for layout, spec in specs_for(model_type).items():
        templates["hf"].update(spec.params)
        templates[layout] = {hf_t if rule.target is None else rule.target for hf_t, rule in spec.params.items()}
    names = list(names)
    return {layout: [n for n in names if any(_pattern(t).match(n) for t in ts)] for layout, ts in templates.items()}


def layout_hint(names: Iterable[str], model_type: str, src: str) -> str:
    """``"these look like X names (e.g. ...); did you mean src='x'?"`` when another layout's table fits
    ``names`` better than ``src``'s (the usual slip: the right state dict under the wrong ``src``), else ``""``."""
    fits = layout_fits(names, model_type)
    own = set(fits.get(src, ()))
    best = max((layout for layout in fits if layout != src), key=lambda layout: len(fits[layout]), default=None)
    if best is None or len(fits[best]) <= len(own):
        return ""
    example = next((n for n in fits[best] if n not in own), fits[best][0])
    return f"these look like {LABELS[best]} names (e.g. {example!r}); did you mean src={best!r}?"


def _unknown(arch: BoundArch, src: str, unknown: list[str], names: list[str]) -> MappingError:
    hint = layout_hint(names, arch.spec.model_types[0], src) if arch.spec.model_types else ""
    lead = f"{hint} " if hint else ""
    if src == "hf":
        return MappingError(
            f"{lead}{len(unknown)} HF tensor(s) are not in the {arch.name!r} table for the {LABELS[arch.layout]} "
            f"layout: {unknown[:8]}; check the config's model_type matches the weights (and that the layout "
            "has them)"
        )
    return MappingError(
        f"{lead}{len(unknown)} {LABELS[src]} tensor(s) have no HF counterpart in the {arch.name!r} table: "
        f"{unknown[:8]}; is the config the weights' own, and the model unquantized?"
    )


def resolve(names: Iterable[str], arch: BoundArch, src: str) -> list[Step]:
    """The steps for tensors named in layout ``src`` (``"hf"`` or ``arch.layout``); names no table entry
    instantiates raise ``MappingError``.

    With tied embeddings the target layout has no tied tensor: an HF one is skipped (HF state dicts may
    hold it), a target one means the config is not the weights' own. Tied HF names get ``tied`` steps.
    """
    from_hf = src == "hf"
    steps: list[Step] = []
    unknown = []
    names = list(names)  # iterated again by the error path's hint
    for name in names:
        found = False
        for hf_name, target, rule in _entries(arch, name, from_hf):
            found = True
            if arch.tied and hf_name in arch.spec.tied:
                if from_hf:
                    continue
                label = LABELS[src]
                raise MappingError(
                    f"{label} tensor {name!r} exists but config ties word embeddings (tie_word_embeddings=True), "
                    f"so the {label} layout has no such tensor; pass the weights' own config"
                )
            steps.append(_step(arch, hf_name, target, rule))
        if not found:
            unknown.append(name)
    if unknown:
        raise _unknown(arch, src, unknown, names)
    return (steps + _tied_steps(arch, steps)) if arch.tied else steps


def check_layouts(*layouts: str) -> None:
    for layout in layouts:
        if layout not in LAYOUTS:
            raise MappingError(f"unknown layout {layout!r}; use one of {', '.join(map(repr, LAYOUTS))}")


def plan(names: Iterable[str], config: Any, src: str, dst: str) -> list[Step]:
    """The steps taking tensors named ``names`` from layout ``src`` to ``dst`` (one side must be ``"hf"``).

    ``step.kind(src, dst)`` says per tensor whether ``dst`` is a view of ``src`` or a copy.
    """
    check_layouts(src, dst)
    if "hf" not in (src, dst) or src == dst:
        raise MappingError(f"plan() maps one hop to or from 'hf'; plan {src!r} -> 'hf' -> {dst!r} in two")
    return resolve(names, bound_arch(config, dst if src == "hf" else src), src)


def plan_from_vllm(names: Iterable[str], config: Any) -> list[Step]:
    """Resolve vLLM tensor names to the HF tensors they hold. Unknown names raise ``MappingError``."""
    return resolve(names, bound_arch(config, "vllm"), "vllm")


def plan_from_hf(names: Iterable[str], config: Any) -> list[Step]:
    """Resolve HF tensor names to their place in vLLM tensors. Unknown names raise ``MappingError``."""
    return resolve(names, bound_arch(config, "vllm"), "hf")
