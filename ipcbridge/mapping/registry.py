"""The tables by layout: which architecture's table maps a config, and adding tables.

``ARCHITECTURES`` (vLLM) and ``META_ARCHITECTURES`` (Meta) start as the tables of
:mod:`~ipcbridge.mapping.tables` and are the lists :func:`register` edits, so a registered table serves
every later lookup.
"""

from __future__ import annotations

import logging
from typing import Any

from ipcbridge.errors import MappingError
from ipcbridge.hf import model_type
from ipcbridge.mapping.spec import ArchSpec, BoundArch
from ipcbridge.mapping.tables import meta as meta_tables
from ipcbridge.mapping.tables import vllm as vllm_tables

logger = logging.getLogger(__name__)

LAYOUTS = ("hf", "vllm", "meta")

ARCHITECTURES: list[ArchSpec] = list(vllm_tables.TABLES)
META_ARCHITECTURES: list[ArchSpec] = list(meta_tables.TABLES)
_TABLES: dict[str, list[ArchSpec]] = {"vllm": ARCHITECTURES, "meta": META_ARCHITECTURES}

# Model types people reach for that no table maps, and what to do instead.
HINTS = {
    "gemma3": "that is the multimodal Gemma3ForConditionalGeneration; attach its text model with "
    "config.get_text_config() (model_type 'gemma3_text')",
}


def _tables(layout: str) -> list[ArchSpec]:
    if layout not in _TABLES:
        raise MappingError(
            f"no tables for layout {layout!r}: the layouts with tables are {' and '.join(map(repr, _TABLES))}"
        )
    return _TABLES[layout]


def register(spec: ArchSpec, layout: str = "vllm") -> None:
    """Add an architecture's table for ``layout`` (or replace the one serving the same model types)."""
    tables = _tables(layout)
    kept = [a for a in tables if not set(a.model_types) & set(spec.model_types)]
    if len(kept) < len(tables):
        logger.info("table %r replaces %s for the %r layout", spec.name,
                    [a.name for a in tables if a not in kept], layout)
    tables[:] = [*kept, spec]


#: Model types without a table that attach through a plan derived from vLLM's loader
#: (:mod:`ipcbridge.mapping.derived`), proven on real vLLM 0.25.1 by tests/vllm/test_vllm_derived.py. Any
#: other architecture whose loader is a pure view chain attaches the same way; these are the ones tested.
DERIVED_MODEL_TYPES = ("olmo2", "granite", "stablelm", "cohere")


def supported_model_types(layout: str = "vllm", paths: bool = False) -> Any:
    """The model types ipcbridge maps for ``layout``. With ``paths=True``, a dict saying which path serves
    each: ``"table"`` (a table, the fast audited path) or ``"derived"`` (no table: the vLLM worker derives
    the plan from its loader; the tested ones are listed, any pure-view loader works)."""
    tables = {mt: "table" for a in _tables(layout) for mt in a.model_types}
    derived = {mt: "derived" for mt in DERIVED_MODEL_TYPES if mt not in tables} if layout == "vllm" else {}
    served = dict(sorted({**derived, **tables}.items()))
    return served if paths else sorted(tables)


def has_table(config: Any, layout: str = "vllm") -> bool:
    """Whether a table serves ``config``'s model type for ``layout`` (no config checks)."""
    mt = model_type(config)
    return any(mt in a.model_types for a in _tables(layout))


def specs_for(model_type: str) -> dict[str, ArchSpec]:
    """Each layout's table serving ``model_type`` (layouts without one are absent): what an error message
    compares a state dict's names against to guess which layout they are in."""
    return {layout: a for layout, tables in _TABLES.items() for a in tables if model_type in a.model_types}


def get_arch(config: Any, layout: str = "vllm") -> ArchSpec:
    """The table mapping ``config``'s architecture between HF and ``layout``, after checking the config
    is a variant the table maps."""
    mt = model_type(config)
    for a in _tables(layout):
        if mt in a.model_types:
            a.check(config)
            return a
    hint = f" ({HINTS[mt]})" if mt in HINTS else ""
    raise MappingError(
        f"unknown architecture {mt!r}{hint} for the {layout!r} layout: ipcbridge maps "
        f"{', '.join(supported_model_types(layout))}. Add a table with "
        f"ipcbridge.mapping.register(ArchSpec(...), layout={layout!r}) or use a supported model"
    )


def bound_arch(config: Any, layout: str) -> BoundArch:
    """``config``'s table for ``layout`` with the config's facts read once (what a plan resolves against)."""
    return BoundArch.of(get_arch(config, layout), config, layout)
