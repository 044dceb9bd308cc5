"""Export an attached model as a standard Hugging Face checkpoint (safetensors shards, config, index).

An attached model's parameters are views of the engine's tensors: q/k/v (and gate/up) are row slices of
one fused storage, the embedding a slice of a padded one, GPT-2's Conv1D weights transposed views.
safetensors refuses to write tensors that share a storage, so every tensor must be copied out. Here each
tensor is copied to host memory into the shard being built, the shard is written and dropped, so at most
one shard of copies exists at a time and the engine's device memory is never touched.

``transformers``' own ``model.save_pretrained`` (and so ``Trainer.save_model`` and the Trainer's
``checkpoint-N`` saves) also works on an attached model: since 4.3x it clones tensors that share a storage
without overlapping before writing, and drops tied duplicates. It clones all of them at once, on the
model's device: a second copy of nearly every weight in GPU memory next to the engine. Where that does not
fit, call ``ipcbridge.save_pretrained(trainer.model, dir)`` instead of ``trainer.save_model(dir)``, and
keep the Trainer's own saving off (``save_strategy="no"``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ipcbridge.errors import BridgeError

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"5GB"`` (decimal, as HF) or ``"512MiB"`` (binary)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
        if m is None:
            raise ValueError(f"max_shard_size={size!r}: give bytes as an int or a string like '5GB' or '512MiB'")
        n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive")
    return n


def _tied_patterns(model: nn.Module) -> list[str]:
    """HF's declared tied (duplicate) parameter names: ``_tied_weights_keys`` of every submodule (a dict
    target -> source in transformers 5, a list of patterns in 4.x)."""
    patterns = []
    for prefix, module in model.named_modules():
        keys = getattr(module, "_tied_weights_keys", None) or ()
        if isinstance(keys, Mapping):
            keys = keys.keys()
        patterns += [f"{prefix}.{k}" if prefix else str(k) for k in keys]
    return patterns


def _matches(name: str, patterns: Iterable[str]) -> bool:
    for pat in patterns:
        try:
            if re.search(pat, name):
                return True
        except re.error:
            if pat == name:
                return True
    return False


def _identity(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an HF checkpoint of ``model`` holds: its state dict minus tied duplicates.

    As in HF's ``save_pretrained``, a tied ``lm_head`` is left out (``from_pretrained`` ties it back):
    of names bound to the very same tensor, one not declared tied in ``_tied_weights_keys`` is kept.
    The returned tensors still alias the model's memory.
    """
    state = model.state_dict()
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, t in state.items():
        if t.is_meta:
            raise BridgeError(f"{name} is on the meta device: nothing to save (attach or load the model first)")
        groups.setdefault(_identity(t), []).append(name)
    patterns = _tied_patterns(model)
    keep = {}
    for names in groups.values():
        primary = next((n for n in names if not _matches(n, patterns)), names[0])
        keep[primary] = state[primary]
        if len(names) > 1:
            logger.debug("not saving %s: tied to %s", [n for n in names if n != primary], primary)
    return {n: keep[n] for n in state if n in keep}


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    # One contiguous host copy, whatever the source's strides (transposed Conv1D views) or device.
    out = torch.empty(tuple(t.shape), dtype=t.dtype, device="cpu")
    out.copy_(t.detach())
    return out


def _plan_shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _save_config(model: nn.Module, path: str, dtype: torch.dtype | None) -> None:
    config = getattr(model, "config", None)
    if config is None:
        raise BridgeError("the model has no .config: save_pretrained writes transformers models only")
    config = copy.deepcopy(config)  # as HF does, but without mutating the live model's config
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(path)
    generation_config = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    if generation_config is not None and can_generate():
        generation_config.save_pretrained(path)


def save_pretrained(model: nn.Module, path: str | os.PathLike[str], max_shard_size: int | str = "5GB") -> list[str]:
    """Write ``model`` (an attached model, or any ``transformers`` model) as a standard HF checkpoint.

    ``path`` gets ``config.json`` (and ``generation_config.json``), and the weights with HF names:
    ``model.safetensors`` when they fit in one shard of ``max_shard_size``, else
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``. Loadable with
    ``AutoModelForCausalLM.from_pretrained(path)``. Tensors are copied to host memory one shard at a
    time; the model is not modified. Shard files of an earlier save in ``path`` are removed. Returns the
    paths of the weight files written.
    """
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = checkpoint_tensors(model)
    if not tensors:
        raise BridgeError("the model has no tensors to save")
    shards = _plan_shards(tensors, limit)
    n = len(shards)
    files = [WEIGHTS_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    keep = {*files, INDEX_NAME} if n > 1 else set(files)
    for stale in os.listdir(path):
        if _SHARD.fullmatch(stale) and stale not in keep and os.path.isfile(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))

    weight_map: dict[str, str] = {}
    total = 0
    written = []
    for file, names in zip(files, shards, strict=True):
        shard = {}
        for name in names:
            shard[name] = _host_copy(tensors[name])
            total += shard[name].numel() * shard[name].element_size()
            weight_map[name] = file
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        del shard  # drop this shard's copies before building the next one
        written.append(os.path.join(path, file))
        logger.debug("wrote %s (%d tensors)", file, len(names))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(path, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
    floating = [t.dtype for t in tensors.values() if t.is_floating_point()]
    _save_config(model, path, floating[0] if floating else None)
    logger.info("saved %d tensors (%d bytes) in %d shard(s) to %s", len(tensors), total, n, path)
    return written
