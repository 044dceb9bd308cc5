"""HF <-> vLLM name and layout mapping, table-driven per architecture.

``to_vllm(hf_sd, config)`` builds vLLM's layout (copies where vLLM fuses or pads); ``hf_views(vllm_sd,
config)`` gives HF-named zero-copy views of it. ``plan_from_vllm``/``plan_from_hf`` say, per tensor, how
the two relate and whether a direction is an alias or a copy.
"""

from ipcbridge.mapping.archs import ARCHITECTURES, ArchSpec, get_arch, register, supported_model_types
from ipcbridge.mapping.core import Step, hf_views, plan_from_hf, plan_from_vllm, to_vllm
from ipcbridge.mapping.rules import GATE_UP, QKV, Rows, Rule, Same, Transposed, Vocab

__all__ = [
    "ARCHITECTURES", "GATE_UP", "QKV", "ArchSpec", "Rows", "Rule", "Same", "Step", "Transposed", "Vocab",
    "get_arch", "hf_views", "plan_from_hf", "plan_from_vllm", "register", "supported_model_types", "to_vllm",
]
