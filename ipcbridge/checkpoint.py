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

Shards are planned by ``huggingface_hub``'s ``split_torch_state_dict_into_shards``, as ``transformers``
plans them, so the files and index are the ones ``model.save_pretrained`` would write. Tokenizer and
generation-config files are copied from the model's source directory, so that vLLM (or
``AutoTokenizer.from_pretrained``) can load the checkpoint directory on its own.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from ipcbridge.errors import BridgeError

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
#: Files of a model directory besides its config and weights that a reload needs: the tokenizer (every
#: format transformers and vLLM read) and the generation config (vLLM takes its sampling defaults and stop
#: tokens from it). config.json is never among them: it is written from the model's own config.
SOURCE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
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


def _plan_shards(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> dict[str, list[str]]:
    """File name -> tensor names, as ``transformers``' ``save_pretrained`` plans them (same names, same split).

    The planner is given meta stand-ins, not the tensors: an attached model's tensors share the engine's
    storages (q/k/v one fused storage, the embedding a padded one, a shm segment), and the planner puts
    tensors of one storage into one shard and counts the whole storage's bytes, which would put most of a
    model into a single shard. ``transformers`` clones such tensors before planning, all at once; the
    stand-ins give the plan it gets after that clone (each tensor its own contiguous bytes) without a copy.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    stand_ins = {n: torch.empty(tuple(t.shape), dtype=t.dtype, device="meta") for n, t in tensors.items()}
    split = split_torch_state_dict_into_shards(stand_ins, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_bytes)
    return {file: list(names) for file, names in split.filename_to_tensors.items()}


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


def _source_dir(model: nn.Module, source_dir: str | os.PathLike[str] | Literal[False] | None) -> str | None:
    """The directory to copy tokenizer and generation files from: ``source_dir`` when given (it must exist);
    by default the directory the model's config was loaded from (``config._name_or_path``, as
    ``from_pretrained`` and the engines record it) when that is a local directory; ``False``: none."""
    if source_dir is False:
        return None
    if source_dir is not None:
        where = os.fspath(source_dir)
        if not os.path.isdir(where):
            raise FileNotFoundError(
                f"source_dir={where!r} is not a directory: pass the model directory holding the tokenizer files "
                "(the one the engine loaded), or source_dir=False to save without them"
            )
        return where
    origin = getattr(getattr(model, "config", None), "_name_or_path", None)
    return origin if isinstance(origin, str) and origin and os.path.isdir(origin) else None


def _copy_source_files(source: str | None, path: str) -> list[str]:
    """Copy the :data:`SOURCE_FILES` that ``source`` has into ``path``; returns the names copied."""
    if source is None:
        return []
    copied = []
    for name in SOURCE_FILES:
        src, dst = os.path.join(source, name), os.path.join(path, name)
        if not os.path.isfile(src):
            continue
        if os.path.exists(dst) and os.path.samefile(src, dst):
            continue  # saving into the source directory: the file is already there
        shutil.copyfile(src, dst)  # follows symlinks (an HF cache snapshot), so the copy holds the content
        copied.append(name)
    logger.debug("copied %s from %s", copied, source)
    return copied


def _remove_stale_shards(path: str, keep: set[str]) -> None:
    # A stale shard or index next to the new files would make from_pretrained load the wrong weights.
    for stale in os.listdir(path):
        if _SHARD.fullmatch(stale) and stale not in keep and os.path.isfile(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))


def _write_shards(tensors: Mapping[str, torch.Tensor], plan: dict[str, list[str]], path: str) -> int:
    """Write each planned shard, building its host copies only while it is written; returns total bytes."""
    from safetensors.torch import save_file

    total = 0
    for file, names in plan.items():
        shard = {name: _host_copy(tensors[name]) for name in names}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        del shard  # drop this shard's copies before building the next one
        logger.debug("wrote %s (%d tensors)", file, len(names))
    return total


def save_pretrained(model: nn.Module, path: str | os.PathLike[str], max_shard_size: int | str = "5GB", *,
                    source_dir: str | os.PathLike[str] | Literal[False] | None = None) -> list[str]:
    """Write ``model`` (an attached model, or any ``transformers`` model) as a standard HF checkpoint.

    ``path`` gets ``config.json`` (and ``generation_config.json``), and the weights with HF names:
    ``model.safetensors`` when they fit in one shard of ``max_shard_size``, else
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``, planned as ``transformers``'
    ``save_pretrained`` plans them. Loadable with ``AutoModelForCausalLM.from_pretrained(path)``. Tensors
    are copied to host memory one shard at a time; the model is not modified. Shard files of an earlier
    save in ``path`` are removed. Returns the paths of the weight files written.

    Tokenizer and generation-config files (:data:`SOURCE_FILES`) present in ``source_dir`` are copied too,
    so that vLLM can serve ``path``; by default ``source_dir`` is the directory the model's config came
    from (``config._name_or_path``) if it is a local one, and ``source_dir=False`` copies nothing. A copied
    ``generation_config.json`` replaces the one derived from the model's config (the source's carries the
    sampling defaults and stop tokens); ``config.json`` is always the model's own.
    """
    limit = parse_size(max_shard_size)
    path = os.fspath(path)
    source = _source_dir(model, source_dir)  # before writing anything: a bad source_dir fails clean
    tensors = checkpoint_tensors(model)
    if not tensors:
        raise BridgeError("the model has no tensors to save")
    plan = _plan_shards(tensors, limit)
    sharded = len(plan) > 1
    os.makedirs(path, exist_ok=True)
    _remove_stale_shards(path, {*plan, INDEX_NAME} if sharded else set(plan))
    total = _write_shards(tensors, plan, path)
    if sharded:
        # As transformers writes it: total_parameters (of the model, ties counted once) and total_size.
        n_params = sum(p.numel() for p in model.parameters())
        weight_map = {name: file for file, names in plan.items() for name in names}
        index = {"metadata": {"total_parameters": n_params, "total_size": total}, "weight_map": weight_map}
        with open(os.path.join(path, INDEX_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    floating = [t.dtype for t in tensors.values() if t.is_floating_point()]
    _save_config(model, path, floating[0] if floating else None)
    _copy_source_files(source, path)
    logger.info("saved %d tensors (%d bytes) in %d shard(s) to %s", len(tensors), total, len(plan), path)
    return [os.path.join(path, file) for file in plan]
