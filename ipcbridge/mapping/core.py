"""Pure mapping functions between layouts of one model's tensors, driven by the tables.

A plan resolves every tensor name against a table (:mod:`~ipcbridge.mapping.archs` for vLLM,
:mod:`~ipcbridge.mapping.meta` for Meta) into :class:`Step` s, one per HF tensor, each saying how the HF
tensor relates to the other layout's tensor and whether each direction is an alias or a copy. The same
plan runs both ways: ``_to_hf`` applies it other -> HF (views, or the rotary permutation), ``_from_hf``
HF -> other (concatenating, padding, transposing, permuting). ``convert`` chains them between any two
layouts; ``hf_views`` and ``to_vllm`` are the vLLM shortcuts. Nothing here touches processes or devices.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import torch

from ipcbridge.errors import MappingError
from ipcbridge.mapping.archs import LAYOUTS, ArchSpec, get_arch, kv_heads, positive
from ipcbridge.mapping.meta import permute_rotary, unpermute_rotary
from ipcbridge.mapping.rules import Rotary, Rows, Rule, Vocab

logger = logging.getLogger(__name__)

Kind = Literal["alias", "copy"]
LABELS = {"hf": "HF", "vllm": "vLLM", "meta": "Meta"}


@dataclass(frozen=True)
class Step:
    """How one HF tensor relates to one tensor of another layout (``layout``, vLLM unless a Meta plan).

    ``vllm`` is the tensor's name in ``layout``. ``start:stop`` are the rows of that tensor the HF tensor
    occupies (for ``rows`` and ``vocab``); ``tied_to`` names the HF tensor a tied one shares (``lm_head`` ->
    embedding); ``heads`` is the head count a ``rotary`` permutation groups rows by.
    """

    hf: str
    vllm: str
    op: str
    start: int | None = None
    stop: int | None = None
    #: Rows of the whole vLLM tensor (fused or padded), to validate shapes.
    total: int | None = None
    part: str | None = None
    parts: tuple[str, ...] = ()
    tied_to: str | None = None
    #: Building the other layout's tensor from HF ones needs a copy (fusing, padding, transposing, permuting).
    copy_to_vllm: bool = False
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
        return "copy" if (self.copy_to_hf if dst == "hf" else self.copy_to_vllm) else "alias"

    @property
    def reason(self) -> str:
        return {
            "same": "same tensor",
            "tied": f"tied to {self.tied_to}",
            "rows": f"rows {self.start}:{self.stop} of fused {self.vllm}",
            "vocab": f"rows :{self.stop} of {self.vllm} (vocab padding dropped)",
            "transpose": f"transpose of {self.vllm}",
            "rotary": f"{self.vllm} with Meta's interleaved rotary pairs regrouped into HF's half-split "
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
            "rows": f"{self.vllm} fuses {'|'.join(self.parts)}: building it concatenates them",
            "vocab": f"{self.vllm} is padded to {self.total} rows",
            "transpose": f"{self.vllm} is the contiguous transpose of {self.hf}",
        }.get(self.op, self.reason)


@cache
def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


def _match(template: str, name: str) -> tuple[str, ...] | None:
    m = _pattern(template).match(name)
    return m.groups() if m else None


def _other_template(hf_template: str, rule: Rule) -> str:
    return hf_template if rule.vllm is None else rule.vllm


def _row_range(arch: ArchSpec, rule: Rows | Vocab, config: Any) -> tuple[int, int, int]:
    """(start, stop, total rows) of ``rule``'s block in its vLLM tensor."""
    if isinstance(rule, Vocab):
        return 0, arch.vocab_size(config), arch.padded_vocab(config)
    sizes = arch.sizes(config)
    missing = [p for p in rule.parts if p not in sizes]
    if missing:
        raise MappingError(f"table {arch.name!r}: its sizes() gives no row count for part(s) {missing}")
    start = sum(sizes[p] for p in rule.parts[: rule.parts.index(rule.part)])
    return start, start + sizes[rule.part], sum(sizes[p] for p in rule.parts)


def _rotary_heads(rule: Rotary, config: Any) -> int:
    if rule.heads == "q":
        return positive(config, "num_attention_heads")
    if rule.heads == "kv":
        return kv_heads(config)
    raise MappingError(f"Rotary(heads={rule.heads!r}) in a table: heads must be 'q' or 'kv'")


def _step(arch: ArchSpec, config: Any, hf: str, other: str, rule: Rule, layout: str) -> Step:
    start = stop = total = heads = None
    if isinstance(rule, (Rows, Vocab)):
        start, stop, total = _row_range(arch, rule, config)
    if isinstance(rule, Rotary):
        heads = _rotary_heads(rule, config)
    part, parts = (rule.part, rule.parts) if isinstance(rule, Rows) else (None, ())
    return Step(hf=hf, vllm=other, op=rule.op, start=start, stop=stop, total=total, part=part, parts=parts,
                copy_to_vllm=rule.copy_to_vllm, copy_to_hf=rule.copy_to_hf, heads=heads, layout=layout)


def _tied_steps(arch: ArchSpec, steps: list[Step]) -> list[Step]:
    by_hf = {s.hf: s for s in steps}
    out = []
    for name, target in arch.tied.items():
        if target in by_hf:
            t = by_hf[target]
            out.append(Step(hf=name, vllm=t.vllm, op="tied", start=t.start, stop=t.stop, total=t.total,
                            tied_to=target, layout=t.layout))
    return out


def _plan_from_other(names: Iterable[str], config: Any, layout: str) -> list[Step]:
    arch = get_arch(config, layout)
    label = LABELS[layout]
    tied = arch.is_tied(config)
    steps: list[Step] = []
    unknown = []
    for name in names:
        found = False
        for hf_t, rule in arch.params.items():
            groups = _match(_other_template(hf_t, rule), name)
            if groups is None:
                continue
            hf_name = hf_t.format(*groups)
            if tied and hf_name in arch.tied:
                raise MappingError(
                    f"{label} tensor {name!r} exists but config ties word embeddings (tie_word_embeddings=True), "
                    f"so the {label} layout has no such tensor; pass the weights' own config"
                )
            steps.append(_step(arch, config, hf_name, name, rule, layout))
            found = True
        if not found:
            unknown.append(name)
    if unknown:
        raise MappingError(
            f"{len(unknown)} {label} tensor(s) have no HF counterpart in the {arch.name!r} table: {unknown[:8]}; "
            "is the config the weights' own, and the model unquantized?"
        )
    if tied:
        steps += _tied_steps(arch, steps)
    return steps


def _plan_from_hf(names: Iterable[str], config: Any, layout: str) -> list[Step]:
    arch = get_arch(config, layout)
    tied = arch.is_tied(config)
    steps: list[Step] = []
    unknown = []
    for name in names:
        for hf_t, rule in arch.params.items():
            groups = _match(hf_t, name)
            if groups is not None:
                if not (tied and name in arch.tied):
                    steps.append(_step(arch, config, name, _other_template(hf_t, rule).format(*groups), rule,
                                       layout))
                break
        else:
            unknown.append(name)
    if unknown:
        raise MappingError(
            f"{len(unknown)} HF tensor(s) are not in the {arch.name!r} table for the {LABELS[layout]} layout: "
            f"{unknown[:8]}; check the config's model_type matches the weights (and that the layout has them)"
        )
    if tied:
        steps += _tied_steps(arch, steps)
    return steps


def plan_from_vllm(names: Iterable[str], config: Any) -> list[Step]:
    """Resolve vLLM tensor names to the HF tensors they hold. Unknown names raise ``MappingError``."""
    return _plan_from_other(names, config, "vllm")


def plan_from_hf(names: Iterable[str], config: Any) -> list[Step]:
    """Resolve HF tensor names to their place in vLLM tensors. Unknown names raise ``MappingError``."""
    return _plan_from_hf(names, config, "vllm")


def plan(names: Iterable[str], config: Any, src: str, dst: str) -> list[Step]:
    """The steps taking tensors named ``names`` from layout ``src`` to ``dst`` (one side must be ``"hf"``).

    ``step.kind(src, dst)`` says per tensor whether ``dst`` is a view of ``src`` or a copy.
    """
    _check_layouts(src, dst)
    if "hf" not in (src, dst) or src == dst:
        raise MappingError(f"plan() maps one hop to or from 'hf'; plan {src!r} -> 'hf' -> {dst!r} in two")
    return _plan_from_hf(names, config, dst) if src == "hf" else _plan_from_other(names, config, src)


def _check_layouts(*layouts: str) -> None:
    for layout in layouts:
        if layout not in LAYOUTS:
            raise MappingError(f"unknown layout {layout!r}; use one of {', '.join(map(repr, LAYOUTS))}")


# ---- applying plans -------------------------------------------------------------------------------------


def _check_rows(step: Step, t: torch.Tensor, total: int, what: str) -> None:
    if t.dim() == 0 or t.shape[0] != total:
        raise MappingError(
            f"{step.vllm}: expected {total} rows ({what}) from the config, got shape {list(t.shape)}; "
            "is this the weights' own config?"
        )


def _narrow(s: Step, t: torch.Tensor) -> torch.Tensor:
    start, stop, total = s.start or 0, s.stop or 0, s.total or 0  # always set for rows/vocab steps
    _check_rows(s, t, total, "padded vocab" if s.op == "vocab" else f"fused {'|'.join(s.parts)}")
    return t.narrow(0, start, stop - start)


def _transpose(s: Step, t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 2:
        raise MappingError(f"{s.vllm}: expected a 2-d weight to transpose, got shape {list(t.shape)}")
    return t.t()


# Other layout -> HF, per op: a view for every op but the rotary permutation.
_TO_HF: dict[str, Callable[[Step, torch.Tensor], torch.Tensor]] = {
    "same": lambda s, t: t,
    "rows": _narrow,
    "vocab": _narrow,
    "transpose": _transpose,
    "rotary": lambda s, t: permute_rotary(t, s.heads or 0, s.vllm),
}


def _to_hf(state_dict: Mapping[str, torch.Tensor], steps: list[Step]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for s in steps:
        if s.op != "tied":
            out[s.hf] = _TO_HF[s.op](s, state_dict[s.vllm])
    for s in steps:
        if s.op == "tied":
            out[s.hf] = out[s.tied_to]  # the very same tensor object: one Parameter after binding
    return out


def _from_hf(hf_state_dict: Mapping[str, torch.Tensor], steps: list[Step]) -> dict[str, torch.Tensor]:
    fused: dict[str, dict[str, tuple[Step, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for s in steps:
        if s.op == "tied":
            continue
        t = hf_state_dict[s.hf]
        if s.op == "rows":
            if t.dim() == 0 or t.shape[0] != s.stop - s.start:
                raise MappingError(
                    f"{s.hf}: expected {s.stop - s.start} rows (part {s.part!r} of {s.vllm}) from the config, "
                    f"got shape {list(t.shape)}"
                )
            fused.setdefault(s.vllm, {})[s.part or ""] = (s, t)
        elif s.op == "vocab":
            if t.dim() == 0 or t.shape[0] != s.stop:
                raise MappingError(f"{s.hf}: expected {s.stop} rows (config.vocab_size), got {list(t.shape)}")
            padded = t.new_zeros((s.total, *t.shape[1:]))
            padded[: s.stop] = t
            out[s.vllm] = padded
        elif s.op == "transpose":
            out[s.vllm] = _transpose(s, t).contiguous()
        elif s.op == "rotary":
            out[s.vllm] = unpermute_rotary(t, s.heads or 0, s.hf)
        else:
            out[s.vllm] = t
    for name, parts in fused.items():
        order = next(iter(parts.values()))[0].parts
        missing = [p for p in order if p not in parts]
        if missing:
            raise MappingError(
                f"{name}: the HF tensor(s) for part(s) {missing} are missing; all of {list(order)} are needed "
                "to fuse it"
            )
        out[name] = torch.cat([parts[p][1] for p in order], dim=0)
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
        view, src = views[s.hf], vllm_state_dict[s.vllm]
        if view.numel() and view.untyped_storage().data_ptr() != src.untyped_storage().data_ptr():
            raise MappingError(f"{s.hf}: would need a copy of {s.vllm} ({s.reason}); refusing")
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
            a, b = (s.vllm, s.hf) if dst == "hf" else (s.hf, s.vllm)
            raise MappingError(
                f"{LABELS[src]} tensor {a!r} -> {LABELS[dst]} {b!r} needs a copy: {s.copy_reason(dst)}. "
                "Zero-copy attaching needs views only: export the engine's weights in the 'vllm' (or 'hf') "
                "layout, or call convert(..., alias_only=False) for copies"
            )


def hf_parameter_shapes(config: Any) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The config's HF model: every parameter name (tied ones too) -> shape, and the names of the
    distinct parameters. Built on the meta device, so it costs no weight memory."""
    from ipcbridge.attach import build_meta_model, to_hf_config  # attach imports this package

    model = build_meta_model(to_hf_config(config), torch.float32)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    return shapes, {n for n, _ in model.named_parameters()}


def _check_coverage(produced: dict[str, str], shapes: dict[str, tuple[int, ...]], unique: set[str],
                    config: Any, src: str) -> None:
    """``produced``: HF name -> the ``src`` name it comes from. Every distinct HF parameter exactly once."""
    label = LABELS[src]
    missing = sorted(unique - produced.keys())
    extra = sorted(produced.keys() - shapes.keys())
    if missing:
        names = missing
        if src != "hf":
            steps = _plan_from_hf(missing, config, src)
            names = sorted({s.vllm for s in steps if s.op != "tied"}) or missing
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
    _check_layouts(src, dst)
    for layout in sorted({src, dst} - {"hf"}):
        get_arch(config, layout)  # an unmapped architecture or variant, before building anything
    names = list(state_dict.keys())
    first = None if src == "hf" else _plan_from_other(names, config, src)
    # HF name -> name in src, to report errors in the caller's names.
    origin = {n: n for n in names} if first is None else {s.hf: s.vllm for s in first}
    shapes, unique = hf_parameter_shapes(config)
    _check_coverage(origin, shapes, unique, config, src)
    second = None if dst in ("hf", src) else _plan_from_hf(list(origin), config, dst)
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
