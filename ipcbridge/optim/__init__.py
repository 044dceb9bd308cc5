"""Optimizers for weights an engine serves: fp32-exact training of bf16/fp16 aliases."""

from ipcbridge.optim.master import MODES, MasterWeights, master_weights

__all__ = ["MODES", "MasterWeights", "master_weights"]
