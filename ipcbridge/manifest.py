"""The manifest: what one process exports so another can map the same weight memory.

A manifest crosses process boundaries as JSON (bytes as base64). It never contains pickle, so opening a
manifest from an untrusted peer cannot run code: the worst a bad manifest can do is fail validation.

Layout of a manifest::

    {"format": "ipcbridge.manifest", "format_version": 1,
     "export_id": "...", "layout": "vllm", "weight_version": 3,
     "producer": {"pid": 123, "boot_id": "...", "hostname": "...", "start_time": 456},
     "config": {...HF config dict...} | null,
     "storages": [{"kind": "cuda_ipc" | "shm", ...transport fields...}, ...],
     "tensors": [{"name": ..., "storage": 0, "dtype": "bfloat16", "shape": [...], "stride": [...],
                  "storage_offset": 0, "nbytes": ...}, ...]}

``Manifest.from_json`` validates every field before anything is mapped: JSON size and depth, types (a bool
or a float is not an int), 64-bit bounds, the version, dtype names, that every tensor's shape, stride and
offset lie inside its storage's bytes without elements sharing memory, that there is at least one tensor and
that every storage is used. Every refusal is a ``ManifestError`` naming the field. Whether the storages are
really the producer's is checked when they are opened (Note [the trust model] in
:mod:`ipcbridge.transports.provenance`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ipcbridge.errors import ManifestError
from ipcbridge.transports.provenance import boot_id, process_start_time
from ipcbridge.wire import (
    DTYPES,
    check_dims,
    check_format,
    check_int,
    check_keys,
    check_strides,
    check_tensor,
    check_type,
    check_version,
    dtype_name,
    parse_json,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "LAYOUTS", "MAX_MANIFEST_BYTES", "Manifest", "Producer", "TensorSpec",
           "boot_id"]

FORMAT = "ipcbridge.manifest"
FORMAT_VERSION = 1
LAYOUTS = ("vllm", "hf", "meta")
#: The longest manifest JSON read: a 400B-parameter model's manifest is about 1 MB, so 64 MiB is ample
#: headroom while bounding what a peer can make the trainer buffer and parse.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024

# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One exported tensor: a strided view into ``storages[storage]``. Offsets and strides in elements."""

    name: str
    storage: int
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    nbytes: int

    def __post_init__(self) -> None:
        where = f"tensor {self.name!r}"
        check_tensor(self.name, self.dtype, self.shape, self.nbytes, where)
        check_int(self.storage, f"{where}.storage")
        check_dims(self.stride, f"{where}.stride")
        if len(self.shape) != len(self.stride):
            raise ManifestError(f"{where}: shape {list(self.shape)} and stride {list(self.stride)} differ in rank")
        check_int(self.storage_offset, f"{where}.storage_offset")
        check_strides(self.shape, self.stride, where)  # every exported tensor is trainable

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def extent_bytes(self) -> int:
        """Bytes of the storage this view touches, counted from the storage's start."""
        if self.numel == 0:
            return self.storage_offset * self.itemsize
        last = self.storage_offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=False))
        return (last + 1) * self.itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, storage: int) -> TensorSpec:
        return cls(
            name=name,
            storage=storage,
            dtype=dtype_name(tensor.dtype),
            shape=tuple(tensor.shape),
            stride=tuple(tensor.stride()),
            storage_offset=tensor.storage_offset(),
            nbytes=tensor.numel() * tensor.element_size(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "storage": self.storage, "dtype": self.dtype, "shape": list(self.shape),
            "stride": list(self.stride), "storage_offset": self.storage_offset, "nbytes": self.nbytes,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TensorSpec:
        fields = {"name", "storage", "dtype", "shape", "stride", "storage_offset", "nbytes"}
        check_keys(d, fields, set(), where)
        check_type(d["shape"], list, f"{where}.shape")
        check_type(d["stride"], list, f"{where}.stride")
        check_type(d["dtype"], str, f"{where}.dtype")
        return cls(**{**d, "shape": tuple(d["shape"]), "stride": tuple(d["stride"])})


@dataclass(frozen=True)
class Producer:
    """The exporting process. Consumers refuse manifests of another boot, of a process that is gone, and
    storages of any other process (Note [the trust model] in :mod:`ipcbridge.transports.provenance`).

    ``start_time`` (clock ticks after boot, from ``/proc/<pid>/stat``; 0 where unknown) tells the producer
    from a later process that reused its pid.
    """

    pid: int
    boot_id: str
    hostname: str
    start_time: int = 0

    def __post_init__(self) -> None:
        check_int(self.pid, "manifest.producer.pid", minimum=1)
        check_type(self.boot_id, str, "manifest.producer.boot_id")
        check_type(self.hostname, str, "manifest.producer.hostname")
        check_int(self.start_time, "manifest.producer.start_time")

    @classmethod
    def current(cls) -> Producer:
        import os
        import socket

        pid = os.getpid()
        return cls(pid=pid, boot_id=boot_id(), hostname=socket.gethostname(),
                   start_time=process_start_time(pid) or 0)

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "boot_id": self.boot_id, "hostname": self.hostname, "start_time": self.start_time}


@dataclass(frozen=True)
class Manifest:
    """Everything a consumer needs to map a producer's weights. Immutable; build new ones with ``replace``.

    ``storages`` hold transport-specific specs (see :mod:`ipcbridge.transports`); ``tensors`` are views
    into them. Tensors that are views of one storage (HF q/k/v of one fused ``qkv_proj``) reference it once.
    """

    tensors: tuple[TensorSpec, ...]
    storages: tuple[Any, ...]
    producer: Producer
    export_id: str
    layout: str = "vllm"
    weight_version: int = 0
    config: Mapping[str, Any] | None = field(default=None, hash=False)
    format_version: int = FORMAT_VERSION
    #: The alias plan the worker derived from vLLM's loader (``LoaderPlan.to_dict()``), for architectures
    #: without a table and for cross-checking tables; validated on creation, absent from older workers.
    loader_plan: Mapping[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        check_type(self.export_id, str, "manifest.export_id")
        check_type(self.layout, str, "manifest.layout")
        if self.layout not in LAYOUTS:
            raise ManifestError(f"manifest.layout: unknown layout {self.layout!r}; expected one of {LAYOUTS}")
        check_int(self.weight_version, "manifest.weight_version")
        if self.config is not None:
            check_type(self.config, Mapping, "manifest.config")
        check_version(self.format_version, FORMAT_VERSION, "manifest")
        check_type(self.producer, Producer, "manifest.producer")
        if self.loader_plan is not None:
            from ipcbridge.mapping.derived import LoaderPlan  # torch-only; mapping never imports the manifest

            LoaderPlan.from_dict(self.loader_plan)
        if not self.tensors:
            raise ManifestError(
                "manifest.tensors: empty; a manifest describes at least one tensor (ipcbridge.export refuses an "
                "empty state dict, so this one was not written by it)"
            )
        self._check_tensors()

    def _check_tensors(self) -> None:
        """Unique names, storage indices in range, every view inside its storage, and every storage used."""
        seen: set[str] = set()
        for t in self.tensors:
            check_type(t, TensorSpec, "manifest.tensors[]")
            if t.name in seen:
                raise ManifestError(f"manifest.tensors: duplicate tensor name {t.name!r}")
            seen.add(t.name)
            if t.storage >= len(self.storages):
                raise ManifestError(
                    f"tensor {t.name!r}.storage: index {t.storage} but only {len(self.storages)} storage(s)"
                )
            size = self.storages[t.storage].nbytes
            if t.extent_bytes() > size:
                raise ManifestError(
                    f"tensor {t.name!r}: shape {list(t.shape)}, stride {list(t.stride)} at offset "
                    f"{t.storage_offset} reaches byte {t.extent_bytes()}, past the end of storage "
                    f"{t.storage} ({size} bytes)"
                )
        unused = sorted(set(range(len(self.storages))) - {t.storage for t in self.tensors})
        if unused:
            raise ManifestError(
                f"manifest.storages[{unused[0]}]: no tensor views it; a manifest lists only the storages its tensors "
                "use (a consumer maps every storage, so an unused one would be mapped for nothing)"
            )

    # -- views ---------------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def transport(self) -> str:
        kinds = sorted({s.kind for s in self.storages})
        return kinds[0] if len(kinds) == 1 else "+".join(kinds)

    def total_bytes(self) -> int:
        """Bytes of the exported storages (each counted once)."""
        return sum(s.nbytes for s in self.storages)

    def replace(self, **changes: Any) -> Manifest:
        import dataclasses

        return dataclasses.replace(self, **changes)

    # -- serialisation -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "export_id": self.export_id,
            "layout": self.layout,
            "weight_version": self.weight_version,
            "producer": self.producer.to_dict(),
            "config": None if self.config is None else dict(self.config),
            "storages": [s.to_dict() for s in self.storages],
            "tensors": [t.to_dict() for t in self.tensors],
            # Written only when present, so a manifest without a plan reads in older ipcbridge versions too.
            **({} if self.loader_plan is None else {"loader_plan": dict(self.loader_plan)}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        from ipcbridge import transports

        top = {"format", "format_version", "export_id", "layout", "weight_version", "producer", "config",
               "storages", "tensors"}
        version = check_format(d, FORMAT, FORMAT_VERSION, "manifest")["format_version"]
        check_keys(d, top, {"loader_plan"}, "manifest")
        p = check_keys(d["producer"], {"pid", "boot_id", "hostname"}, {"start_time"}, "manifest.producer")
        check_type(d["storages"], list, "manifest.storages")
        check_type(d["tensors"], list, "manifest.tensors")
        storages = tuple(
            transports.storage_spec_from_dict(s, f"manifest.storages[{i}]") for i, s in enumerate(d["storages"])
        )
        tensors = tuple(TensorSpec.from_dict(t, f"manifest.tensors[{i}]") for i, t in enumerate(d["tensors"]))
        if d["config"] is not None:
            check_type(d["config"], Mapping, "manifest.config")
        check_type(d["layout"], str, "manifest.layout")
        return cls(
            tensors=tensors,
            storages=storages,
            producer=Producer(**p),
            export_id=d["export_id"],
            layout=d["layout"],
            weight_version=d["weight_version"],
            config=d["config"],
            format_version=version,
            loader_plan=d.get("loader_plan"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and validate a manifest (at most :data:`MAX_MANIFEST_BYTES`, nested at most
        :data:`ipcbridge.wire.MAX_JSON_DEPTH` deep)."""
        d = parse_json(text, "manifest", max_bytes=MAX_MANIFEST_BYTES, error=ManifestError,
                       hint="; pass the string from Manifest.to_json()")
        return cls.from_dict(d)
