"""Export named tensors as a manifest, and open a manifest back into tensors that alias the same memory.

``export`` is the producer side (the engine), ``open_manifest`` the consumer side (the trainer).
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ipcbridge import transports
from ipcbridge._torch import storage_key
from ipcbridge.errors import BridgeError, ManifestError
from ipcbridge.hf import config_dict
from ipcbridge.manifest import Manifest, Producer, TensorSpec
from ipcbridge.transports import provenance

logger = logging.getLogger(__name__)

# export_id -> weak references to the exported tensors, so this process can "open" its own export.
# Note [opening your own export]: CUDA refuses to open an IPC handle in the process that created it.
# Rather than fail, a process that opens its own manifest gets its own tensors back, which alias the
# exported memory by definition.
_LOCAL_EXPORTS: dict[str, dict[str, weakref.ref[torch.Tensor]]] = {}


def named_tensors(source: Mapping[str, torch.Tensor] | nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to export, as the caller's own objects (parameters included), not detached copies."""
    if isinstance(source, nn.Module):
        return dict(source.named_parameters())
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"export() needs tensors; these entries are not: {bad[:5]}")
        return dict(source)
    raise TypeError(f"export() takes a state dict or an nn.Module, got {type(source).__name__}")


def export(
    source: Mapping[str, torch.Tensor] | nn.Module,
    config: Any = None,
    *,
    layout: str = "vllm",
    weight_version: int = 0,
) -> Manifest:
    """Export every tensor of ``source`` (a state dict, or a module's parameters) for another process.

    CUDA tensors are shared through CUDA IPC, CPU tensors through /dev/shm (moved there in place, see
    Note [CPU export moves storages into /dev/shm]). Tensors that are views of one storage share one
    storage entry. The producer must keep the tensors alive while any consumer maps them.
    """
    tensors = named_tensors(source)
    if not tensors:
        raise ManifestError("nothing to export: the state dict/module has no tensors")
    # Keyed by the StorageImpl (``_cdata``), not ``data_ptr()``: sharing a CPU storage moves its bytes, and
    # views of it must still find the entry made for the first tensor.
    storage_index: dict[int, int] = {}
    storages: list[Any] = []
    specs: list[TensorSpec] = []
    for name, t in tensors.items():
        t = t.detach()
        st = t.untyped_storage()
        key = storage_key(st)
        if key not in storage_index:
            storage_index[key] = len(storages)
            storages.append(transports.for_device(t.device).reduce_storage(st))
        specs.append(TensorSpec.of(name, t, storage_index[key]))
    manifest = Manifest(
        tensors=tuple(specs),
        storages=tuple(storages),
        producer=Producer.current(),
        export_id=uuid.uuid4().hex,
        layout=layout,
        weight_version=weight_version,
        config=config_dict(config),
    )
    for stale in [k for k, refs in _LOCAL_EXPORTS.items() if all(r() is None for r in refs.values())]:
        del _LOCAL_EXPORTS[stale]
    _LOCAL_EXPORTS[manifest.export_id] = {n: weakref.ref(t) for n, t in tensors.items()}
    logger.debug("exported %d tensors in %d storages (%s, %d bytes)", len(specs), len(storages),
                 manifest.transport, manifest.total_bytes())
    return manifest


@dataclass
class OpenedManifest:
    """Tensors rebuilt from a manifest, and the storages they alias.

    Ownership: the producer owns the memory. These tensors stay valid while they (or views of them) are
    referenced here, even if the producer exits; call :meth:`close` (or drop every reference) to unmap.
    """

    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    storages: list[torch.UntypedStorage]

    def ranges(self) -> list[tuple[int, int]]:
        """(start, end) byte addresses of each mapped storage: the proof-of-zero-copy reference."""
        return [(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in self.storages]

    def close(self) -> None:
        self.tensors.clear()
        self.storages.clear()
        if torch.cuda.is_available() and self.manifest.transport == "cuda_ipc":
            torch.cuda.ipc_collect()


def _own_export(manifest: Manifest) -> OpenedManifest:
    refs = _LOCAL_EXPORTS.get(manifest.export_id)
    alive = {n: r() for n, r in (refs or {}).items()}
    if refs is None or any(t is None for t in alive.values()):
        raise BridgeError(
            "this manifest was exported by this very process and its tensors are gone; CUDA cannot open a "
            "process's own IPC handles. Pass the state dict itself: ipcbridge.attach(state_dict, config)"
        )
    tensors = {n: t.detach() for n, t in alive.items() if t is not None}
    storages = {storage_key(t.untyped_storage()): t.untyped_storage() for t in tensors.values()}
    return OpenedManifest(manifest, tensors, list(storages.values()))


def open_manifest(manifest: Manifest) -> OpenedManifest:
    """Map every storage of ``manifest`` once and rebuild its tensors as views of them.

    Every storage is checked first (Note [the trust model] in :mod:`ipcbridge.transports.provenance`): a
    refusal is a ``BridgeError`` raised before anything is mapped, and any failure leaves nothing open.
    """
    p = manifest.producer
    provenance.check_boot(p.pid, p.boot_id, p.hostname)
    if p.pid == os.getpid():
        return _own_export(manifest)
    provenance.check_alive(p.pid, p.start_time)
    checked: set[str] = set()  # per open, never across: Note [one check per ref-counter file]
    with contextlib.ExitStack() as held:
        claims = []
        for i, spec in enumerate(manifest.storages):
            c = transports.get(spec.kind).claim(spec, p.pid, f"manifest.storages[{i}]", checked=checked)
            held.callback(c.close)
            claims.append(c)
        return _map(manifest, claims)


def _map(manifest: Manifest, claims: list[Any]) -> OpenedManifest:
    """Map the checked storages and rebuild the tensors as views; on any failure unmap what was mapped."""
    storages: list[torch.UntypedStorage] = []
    try:
        for c in claims:
            storages.append(c.open())
        tensors: dict[str, torch.Tensor] = {}
        for t in manifest.tensors:
            st = storages[t.storage]
            if st.nbytes() < manifest.storages[t.storage].nbytes:
                raise BridgeError(f"storage {t.storage} mapped {st.nbytes()} bytes, expected more")
            view = torch.empty(0, dtype=t.torch_dtype, device=st.device)
            view.set_(st, t.storage_offset, t.shape, t.stride)
            tensors[t.name] = view
    except BaseException:
        storages.clear()
        if torch.cuda.is_available() and manifest.transport == "cuda_ipc":
            torch.cuda.ipc_collect()
        raise
    return OpenedManifest(manifest, tensors, storages)
