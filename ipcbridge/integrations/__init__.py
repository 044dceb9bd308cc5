"""Integrations with training frameworks; each module imports its framework only when used.

This package itself imports nothing but ipcbridge's errors, so the checks here can be used by every
integration (``hf_trainer``'s callback included) without importing another framework.
"""

from __future__ import annotations

from typing import Any

from ipcbridge.errors import BridgeError


def refuse_second_engine(trainer: Any, bridge: Any) -> None:
    """``BridgeError`` if ``trainer`` is a plain ``trl.GRPOTrainer`` training ``bridge.model`` with TRL's own vLLM
    engine (``use_vllm=True``): that engine holds a copy of the weights, which TRL re-copies every step, while
    the bridge's engine goes unused. TRL's generation class is recognised by its module, so nothing is
    imported; ``ipcbridge.integrations.trl``'s own class lives outside ``trl.`` and passes."""
    generation = getattr(trainer, "vllm_generation", None)
    if not getattr(trainer, "use_vllm", False) or generation is None:
        return
    if type(generation).__module__.startswith("trl.") and getattr(trainer, "model", None) is bridge.model:
        raise BridgeError(
            "trl.GRPOTrainer(model=bridge.model, args=GRPOConfig(use_vllm=True)) started a second vLLM engine that "
            "holds a copy of the weights; use ipcbridge.integrations.trl.GRPOTrainer(bridge, ...), whose "
            "generation runs on the bridge's engine with no copy"
        )
