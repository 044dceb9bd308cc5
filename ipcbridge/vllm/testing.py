"""Test, demo and benchmark helpers on the engine side, kept out of the production worker extension.

``worker_extension_cls=TESTING_EXTENSION_QUALNAME`` gives the worker everything
:class:`~ipcbridge.vllm.extension.WorkerExtension` has, plus:

* ``ipcbridge_init_weights``: an HF-style random init in place, for engines started on a bare config
  (``load_format="dummy"``), whose weights otherwise say nothing;
* ``ipcbridge_load_weights``: the copy-based weight sync that frameworks use today, as the baseline
  ``benchmarks/bench_vllm.py`` measures ipcbridge against.

The endpoints accept it like ``WorkerExtension`` (they check ``issubclass``). Don't serve production
traffic with it: ``ipcbridge_load_weights`` opens whatever handles a caller sends.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from ipcbridge.vllm.extension import WorkerExtension
from ipcbridge.vllm.rpc import parse_float, parse_int, worker_method

logger = logging.getLogger(__name__)

#: The qualified name to pass as ``worker_extension_cls`` for tests, demos and benchmarks.
TESTING_EXTENSION_QUALNAME = "ipcbridge.vllm.testing.TestingWorkerExtension"


@torch.no_grad()
def init_weights_(model: nn.Module, seed: int = 0, std: float = 0.02) -> int:
    """HF-style init in place: norms 1 (Gemma's (1 + w) norms 0), biases 0, the rest N(0, ``std``) from
    ``seed``. Returns the count.

    vLLM's dummy weights are uniform in [-1e-3, 1e-3], norms included, so every logit is ~0 and every
    greedy choice a near-tie; tests and demos need weights that say something. Writes into ``model``'s own
    parameters (the engine's memory when run in the worker or through a bridge's views).
    """
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    # Gemma's RMSNorms scale by (1 + w): HF initialises their w to 0. Filling 1 would double the gain of every
    # norm, doubling the logits' spread and the bf16 error with it (docs/mapping.md, the gemma3 section).
    gemma_norms = {f"{m}.{p}" if m else p for m, mod in model.named_modules()
                   if "Gemma" in type(mod).__name__ and "RMSNorm" in type(mod).__name__
                   for p, _ in mod.named_parameters(recurse=False)}
    n = 0
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.fill_(0.0 if name in gemma_norms else 1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) * std)
        n += 1
    return n


class TestingWorkerExtension(WorkerExtension):
    """:class:`WorkerExtension` plus weight re-initialisation and the copy-based baseline (see the module)."""

    __test__ = False  # not a pytest test class, whatever its name

    @worker_method
    def ipcbridge_init_weights(self, seed: int | str = 0, std: float | str = 0.02) -> int:
        """Overwrite the weights in place with :func:`init_weights_` (norms 1, biases 0, the rest
        N(0, ``std``) from ``seed``); the number of parameters written."""
        n = init_weights_(self._ipcbridge_model(), parse_int(seed, "seed"), parse_float(std, "std"))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return n

    @worker_method
    def ipcbridge_load_weights(self, manifest_json: str) -> dict[str, Any]:
        """Copy-based weight sync, for comparison: copy a trainer's exported HF-named weights into the model.

        This is what frameworks do today (vLLM's ``rlhf_colocate`` example): the trainer exports handles of
        its *own* weights, the worker opens them and ``model.load_weights`` copies every tensor in (fusing
        q/k/v and gate/up on the way). Here the handles travel as an ipcbridge manifest (JSON, no pickle).
        The trainer owns the exported tensors; the worker's views of them are closed before this returns.
        Returns the number of tensors and the seconds spent opening and loading.
        """
        from ipcbridge.handles import open_manifest
        from ipcbridge.manifest import Manifest

        t0 = time.perf_counter()
        manifest = Manifest.from_json(manifest_json)
        opened = open_manifest(manifest)
        t1 = time.perf_counter()
        try:
            loaded = self._ipcbridge_model().load_weights(iter(opened.tensors.items()))  # type: ignore[operator]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        finally:
            opened.close()
        t2 = time.perf_counter()
        return {
            "tensors": len(manifest.tensors),
            "loaded": None if loaded is None else len(loaded),
            "open_s": t1 - t0,
            "load_s": t2 - t1,
        }
