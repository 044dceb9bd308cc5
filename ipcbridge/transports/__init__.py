"""Transports: how a storage's memory reaches another process.

One module per transport, loaded lazily by module path so that importing ipcbridge never initialises CUDA
or NCCL. A *sharing* transport (``cuda_ipc``, ``shm``) maps the producer's memory; each module has a
``reduce_storage(storage) -> Spec`` / ``rebuild_storage(spec) -> UntypedStorage`` pair in the style of
``torch.multiprocessing.reductions`` and a frozen ``Spec`` dataclass that crosses the process boundary as
part of a :class:`~ipcbridge.manifest.Manifest`. A *streaming* transport (``nccl``: NCCL on CUDA, gloo on
CPU) copies trainer-owned weights into the engine's where memory cannot be shared; it never appears in a
manifest, so it has a registry of its own (:data:`STREAMING`, :func:`get_streaming`).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

from ipcbridge.errors import BridgeError, ManifestError

#: kind -> module implementing it. Sharing transports appear in manifests.
REGISTRY: dict[str, str] = {
    "cuda_ipc": "ipcbridge.transports.cuda_ipc",
    "shm": "ipcbridge.transports.shm",
}

#: kind -> module implementing a streaming transport (``ipcbridge.stream``). Never named by manifests.
STREAMING: dict[str, str] = {
    "nccl": "ipcbridge.transports.nccl",
}


def _load(registry: dict[str, str], kind: str, error: type[Exception], what: str) -> ModuleType:
    try:
        path = registry[kind]
    except KeyError:
        raise error(f"unknown {what} {kind!r}; known: {sorted(registry)}") from None
    return importlib.import_module(path)


def get(kind: str) -> ModuleType:
    """The sharing transport module for ``kind`` (a manifest's storage kind)."""
    return _load(REGISTRY, kind, ManifestError, "transport")


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


def get_streaming(kind: str) -> ModuleType:
    """The streaming transport module for ``kind`` (``"nccl"``, which also runs gloo on CPU)."""
    return _load(STREAMING, kind, BridgeError, "streaming transport")
