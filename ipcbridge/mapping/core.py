"""Pure mapping functions between HF and vLLM state dicts, driven by :mod:`ipcbridge.mapping.archs`.

One plan, two directions. ``plan_from_vllm``/``plan_from_hf`` resolve every tensor name against the
architecture's table into :class:`Step` s; ``hf_views`` applies them vLLM -> HF as views (aliases),
``to_vllm`` inverts them HF -> vLLM (concatenating and padding: copies). Nothing here touches processes,
devices or models.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import torch

from ipcbridge.errors import MappingError
from ipcbridge.mapping.archs import ArchSpec, get_arch
from ipcbridge.mapping.rules import Rows, Rule, Vocab

Kind = Literal["alias", "copy"]


@dataclass(frozen=True)
class Step:
    """How one HF tensor relates to one vLLM tensor.

    ``start:stop`` are the rows of the vLLM tensor the HF tensor occupies (for ``rows`` and ``vocab``);
    ``tied_to`` names the HF tensor a tied one shares (``lm_head`` -> embedding).
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
    #: Building the vLLM tensor from HF ones needs a copy (fusing, padding, transposing).
    copy_to_vllm: bool = False

    def kind(self, src: str = "vllm", dst: str = "hf") -> Kind:
        """``alias`` if ``dst`` can be a view of ``src`` for this tensor, else ``copy``."""
        if (src, dst) == ("vllm", "hf") or self.op in ("same", "tied"):
            return "alias"
        return "copy" if self.copy_to_vllm else "alias"

    @property
    def reason(self) -> str:
        return {
            "same": "same tensor",
            "tied": f"tied to {self.tied_to}",
            "rows": f"rows {self.start}:{self.stop} of fused {self.vllm}",
            "vocab": f"rows :{self.stop} of {self.vllm} (vocab padding dropped)",
            "transpose": f"transpose of {self.vllm}",
        }.get(self.op, self.op)


@cache
def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


def _match(template: str, name: str) -> tuple[str, ...] | None:
    m = _pattern(template).match(name)
    return m.groups() if m else None


def _vllm_template(hf_template: str, rule: Rule) -> str:
    return hf_template if rule.vllm is None else rule.vllm


def _row_range(arch: ArchSpec, rule: Rule, config: Any) -> tuple[int, int, int]:
    """(start, stop, total rows) of ``rule``'s block in its vLLM tensor."""
    if isinstance(rule, Vocab):
        return 0, arch.vocab_size(config), arch.padded_vocab(config)
    assert isinstance(rule, Rows)
    sizes = arch.sizes(config)
    start = sum(sizes[p] for p in rule.parts[: rule.parts.index(rule.part)])
    return start, start + sizes[rule.part], sum(sizes[p] for p in rule.parts)


def _step(arch: ArchSpec, config: Any, hf: str, vllm: str, rule: Rule) -> Step:
    start = stop = total = None
    if isinstance(rule, (Rows, Vocab)):
        start, stop, total = _row_range(arch, rule, config)
    part, parts = (rule.part, rule.parts) if isinstance(rule, Rows) else (None, ())
    return Step(hf=hf, vllm=vllm, op=rule.op, start=start, stop=stop, total=total, part=part, parts=parts,
                copy_to_vllm=rule.copy_to_vllm)


def _tied_steps(arch: ArchSpec, config: Any, steps: list[Step]) -> list[Step]:
    by_hf = {s.hf: s for s in steps}
    out = []
    for name, target in arch.tied.items():
        if target in by_hf:
            t = by_hf[target]
            out.append(Step(hf=name, vllm=t.vllm, op="tied", start=t.start, stop=t.stop, total=t.total,
                            tied_to=target))
    return out


def plan_from_vllm(names: Iterable[str], config: Any) -> list[Step]:
    """Resolve vLLM tensor names to the HF tensors they hold. Unknown names raise ``MappingError``."""
    arch = get_arch(config)
    names = list(names)
    tied = arch.is_tied(config)
    steps: list[Step] = []
    unknown = []
    for name in names:
        found = False
        for hf_t, rule in arch.params.items():
            groups = _match(_vllm_template(hf_t, rule), name)
            if groups is None:
                continue
            hf_name = hf_t.format(*groups)
            if tied and hf_name in arch.tied:
                raise MappingError(
                    f"vLLM tensor {name!r} exists but config ties word embeddings (tie_word_embeddings=True), "
                    "so vLLM would not have it; pass the engine's own config"
                )
            steps.append(_step(arch, config, hf_name, name, rule))
            found = True
        if not found:
            unknown.append(name)
    if unknown:
        raise MappingError(
            f"{len(unknown)} vLLM tensor(s) have no HF counterpart in the {arch.name!r} table: {unknown[:8]}; "
            "is the config the engine's, and the model unquantized?"
        )
    if tied:
        steps += _tied_steps(arch, config, steps)
    return steps


def plan_from_hf(names: Iterable[str], config: Any) -> list[Step]:
    """Resolve HF tensor names to their place in vLLM tensors. Unknown names raise ``MappingError``."""
    arch = get_arch(config)
    tied = arch.is_tied(config)
    steps: list[Step] = []
    unknown = []
    names = list(names)
    for name in names:
        for hf_t, rule in arch.params.items():
            groups = _match(hf_t, name)
            if groups is not None:
                if not (tied and name in arch.tied):
                    steps.append(_step(arch, config, name, _vllm_template(hf_t, rule).format(*groups), rule))
                break
        else:
            unknown.append(name)
    if unknown:
        raise MappingError(
            f"{len(unknown)} HF tensor(s) are not in the {arch.name!r} table: {unknown[:8]}; check the config's "
            "model_type matches the weights"
        )
    if tied:
        steps += _tied_steps(arch, config, steps)
    return steps


def _check_rows(step: Step, t: torch.Tensor, total: int, what: str) -> None:
    if t.dim() == 0 or t.shape[0] != total:
        raise MappingError(
            f"{step.vllm}: expected {total} rows ({what}) from the config, got shape {list(t.shape)}; "
            "is this the engine's config?"
        )


def hf_views(vllm_state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """HF-named zero-copy views of vLLM-layout tensors: row slices, vocab slices, transposes, tied shares.

    The views alias ``vllm_state_dict``'s memory: writing through them writes the vLLM tensors. A tied
    ``lm_head`` is the very same tensor object as the embedding. Raises ``MappingError`` for names or
    shapes that do not fit the config, and if any tensor would need a copy.
    """
    steps = plan_from_vllm(vllm_state_dict.keys(), config)
    views: dict[str, torch.Tensor] = {}
    for s in steps:
        if s.op == "tied":
            continue
        src = vllm_state_dict[s.vllm]
        if s.op in ("rows", "vocab"):
            _check_rows(s, src, s.total, "padded vocab" if s.op == "vocab" else f"fused {'|'.join(s.parts)}")
            view = src.narrow(0, s.start, s.stop - s.start)
        elif s.op == "transpose":
            view = src.t()
        else:
            view = src
        if view.numel() and view.untyped_storage().data_ptr() != src.untyped_storage().data_ptr():
            raise MappingError(f"{s.hf}: would need a copy of {s.vllm} ({s.reason}); refusing")
        views[s.hf] = view
    for s in steps:
        if s.op == "tied":
            views[s.hf] = views[s.tied_to]
    return views


def to_vllm(hf_state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Build vLLM's exact layout and names from HF tensors (a copy wherever vLLM fuses or pads).

    Fused tensors are ``torch.cat`` of their parts in the table's order (``[q | k | v]``, ``[gate | up]``);
    vocab tensors are zero-padded to the architecture's multiple; a tied ``lm_head`` is dropped.
    """
    steps = plan_from_hf(hf_state_dict.keys(), config)
    fused: dict[str, dict[str, tuple[Step, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for s in steps:
        t = hf_state_dict[s.hf]
        if s.op == "tied":
            continue
        if s.op == "rows":
            if t.dim() == 0 or t.shape[0] != s.stop - s.start:
                raise MappingError(
                    f"{s.hf}: expected {s.stop - s.start} rows (part {s.part!r} of {s.vllm}) from the config, "
                    f"got shape {list(t.shape)}"
                )
            fused.setdefault(s.vllm, {})[s.part] = (s, t)
        elif s.op == "vocab":
            if t.dim() == 0 or t.shape[0] != s.stop:
                raise MappingError(f"{s.hf}: expected {s.stop} rows (config.vocab_size), got {list(t.shape)}")
            padded = t.new_zeros((s.total, *t.shape[1:]))
            padded[: s.stop] = t
            out[s.vllm] = padded
        elif s.op == "transpose":
            out[s.vllm] = t.t().contiguous()
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
