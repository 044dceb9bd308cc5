"""Name and layout mapping between HF, vLLM and Meta state dicts, table-driven per architecture.

``convert(sd, config, src, dst)`` converts between any two of ``"hf"``, ``"vllm"`` and ``"meta"`` (copies
only where a layout fuses, pads, transposes or permutes; ``alias_only=True`` refuses those);
``to_vllm(hf_sd, config)`` and ``hf_views(vllm_sd, config)`` are the vLLM shortcuts. ``plan``,
``plan_from_vllm`` and ``plan_from_hf`` say, per tensor, how two layouts relate and whether a direction
is an alias or a copy.

Layout of the package: :mod:`~ipcbridge.mapping.spec` (the rules and ``ArchSpec``),
:mod:`~ipcbridge.mapping.tables` (the tables, data only), :mod:`~ipcbridge.mapping.registry` (tables by
layout), :mod:`~ipcbridge.mapping.plan` (resolving names into steps), :mod:`~ipcbridge.mapping.convert`
(applying steps to tensors) and :mod:`~ipcbridge.mapping.rotary` (Meta's rotary permutation). Config
fields are read through :mod:`ipcbridge.hf`.
"""

from ipcbridge.mapping.convert import convert, hf_parameter_shapes, hf_views, to_vllm
from ipcbridge.mapping.plan import Step, plan, plan_from_hf, plan_from_vllm
from ipcbridge.mapping.registry import (
    ARCHITECTURES,
    LAYOUTS,
    META_ARCHITECTURES,
    get_arch,
    has_table,
    register,
    supported_model_types,
)
from ipcbridge.mapping.rotary import permute_rotary, unpermute_rotary
from ipcbridge.mapping.spec import GATE_UP, QKV, ArchSpec, Rotary, Rows, Rule, Same, Transposed, Vocab

__all__ = [
    "ARCHITECTURES", "GATE_UP", "LAYOUTS", "META_ARCHITECTURES", "QKV", "ArchSpec", "Rotary", "Rows", "Rule",
    "Same", "Step", "Transposed", "Vocab", "convert", "get_arch", "has_table", "hf_parameter_shapes", "hf_views",
    "permute_rotary", "plan", "plan_from_hf", "plan_from_vllm", "register", "supported_model_types",
    "to_vllm", "unpermute_rotary",
]
