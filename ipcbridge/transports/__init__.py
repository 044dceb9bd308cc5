"""Sharing transports: how a storage's memory reaches another process without a copy.

One module per transport (``cuda_ipc``, ``shm``), loaded lazily by module path so that importing ipcbridge
never initialises CUDA. Each maps the producer's memory: a ``reduce_storage(storage) -> Spec`` /
``rebuild_storage(spec) -> UntypedStorage`` pair in the style of ``torch.multiprocessing.reductions`` and a
frozen ``Spec`` dataclass that crosses the process boundary as part of a
:class:`~ipcbridge.manifest.Manifest`, which names the transport by its kind. ``rebuild_storage`` is
``claim(spec, producer_pid).open()``: ``claim`` runs every provenance check (Note [the trust model] in
:mod:`ipcbridge.transports.provenance`) and maps nothing, so a consumer can check all storages before it
maps any. Its keyword ``checked`` is a set one open of a manifest passes to every claim, for facts shared
by storages that need checking only once per open (a CUDA ref-counter file).

Copying trainer-owned weights into the engine's where memory cannot be shared is not a transport in this
sense (it never appears in a manifest): it lives in :mod:`ipcbridge.stream`.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

from ipcbridge.errors import ManifestError

#: kind -> module implementing it: the storage kinds a manifest may name.
REGISTRY: dict[str, str] = {
    "cuda_ipc": "ipcbridge.transports.cuda_ipc",
    "shm": "ipcbridge.transports.shm",
}


def get(kind: str) -> ModuleType:
    """The sharing transport module for ``kind`` (a manifest's storage kind)."""
    try:
        path = REGISTRY[kind]
    except KeyError:
        raise ManifestError(f"unknown transport {kind!r}; known: {sorted(REGISTRY)}") from None
    return importlib.import_module(path)


def for_device(device: torch.device) -> ModuleType:
    """The sharing transport for memory on ``device``."""
    if device.type == "cuda":
        return get("cuda_ipc")
    if device.type == "cpu":
        return get("shm")
    raise ManifestError(
        f"tensors on {device.type!r} cannot be shared between processes; move them to CUDA or CPU"
    )


def storage_spec_from_dict(d: Any, where: str) -> Any:
    if not isinstance(d, dict) or not isinstance(d.get("kind"), str):
        raise ManifestError(f"{where}: expected an object with a string field 'kind'")
    return get(d["kind"]).Spec.from_dict(d, where)

