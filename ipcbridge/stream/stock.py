"""Streaming into a stock vLLM engine through vLLM's own NCCL weight transfer: no ipcbridge in the engine.

An engine started with ``weight_transfer_config={"backend": "nccl"}`` (``--weight-transfer-config``) has a
receiver of its own (``NCCLWeightTransferEngine``). :class:`StockStreamBridge` is its trainer half, wire
compatible with it: vLLM's lifecycle (``init_weight_transfer_engine`` once, then per push
``start_weight_update``, ``update_weights``, ``finish_weight_update``), its update info (HF checkpoint
names, torch dtype names, shapes, in sending order), its packing (Note [vLLM's packing] in
:mod:`ipcbridge.stream.plan`), its NCCL group (:mod:`ipcbridge.stream.nccl`). The engine loads the HF
tensors with ``load_weights``, which fuses and shards them, so this also feeds TP > 1 engines. What stays
ipcbridge's: the fence (Note [the streaming fence] in :mod:`ipcbridge.stream.bridge`), the double-buffered
:func:`~ipcbridge.stream.protocol.send` into two buffers allocated once, and the checks.

Note [vLLM's wire, by release]
    Read from the release wheels (``vllm/distributed/weight_transfer/nccl_engine.py``, ``nccl_common.py``):
      - 0.25, 0.26, 0.27: init info ``{master_address, master_port, rank_offset, world_size}``; update info
        ``{names, dtype_names, shapes, packed, packed_buffer_size_bytes, packed_num_buffers}``.
      - 0.28, 0.29: ``packed`` and the buffer geometry moved to the init info; the update info is
        ``{names, dtype_names, shapes}`` (an extra key is a ``TypeError`` in the worker).
      - 0.30+: the init info may carry ``nccl_unique_id_b64`` instead of the address and port (Note [vLLM's
        NCCL group] in :mod:`ipcbridge.stream.nccl`): no vLLM needed on the trainer.
    The trainer is rank 0; the engine's workers are ranks ``rank_offset=1`` onward, ``world_size`` is 1 plus
    the engine's world size (TP x PP x DP). :class:`StockWire` writes these dicts, and nothing else does.

Note [the stock receiver's failures]
    vLLM's receiver has no timeout: a trainer that dies mid-push leaves its workers blocked in an NCCL
    broadcast, and that engine stops serving until restarted. The trainer side here is bounded (every
    broadcast has a deadline, the update call a timeout) and aborts its communicator on failure, but it
    cannot unblock the engine. Engines that must survive a trainer's death should run ipcbridge's
    receiver (:mod:`ipcbridge.vllm.receiver`), whose group times out.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ipcbridge.errors import BridgeError
from ipcbridge.stream.bridge import StreamBridge
from ipcbridge.stream.calls import EngineCall
from ipcbridge.stream.layout import Layout
from ipcbridge.stream.nccl import (
    PeerCheck,
    free_port,
    mint_unique_id,
    open_store_comm,
    open_torch_comm,
    unique_id_b64,
)
from ipcbridge.stream.plan import Bucket, StreamPlan, pack

logger = logging.getLogger(__name__)

#: vLLM's ``DEFAULT_PACKED_BUFFER_SIZE_BYTES`` and ``DEFAULT_PACKED_NUM_BUFFERS``.
VLLM_BUFFER_BYTES = 1 << 30
VLLM_NUM_BUFFERS = 2
_FIX_CONFIG = ("Fix: start the engine with vLLM's NCCL weight transfer (LLM(..., weight_transfer_config={'backend': "
               "'nccl'}) or vllm serve --weight-transfer-config '{\"backend\": \"nccl\"}' with VLLM_SERVER_DEV_MODE=1)")


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) of a vLLM version string such as ``"0.25.1"`` or ``"0.30.0rc1+cu130"``."""
    m = re.match(r"\s*(\d+)\.(\d+)", str(text))
    if not m:
        raise BridgeError(f"cannot read the engine's vLLM version from {text!r}")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class StockWire:
    """The init and update info of one vLLM release's NCCL receiver. Note [vLLM's wire, by release]."""

    version: tuple[int, int]
    buffer_bytes: int = VLLM_BUFFER_BYTES
    num_buffers: int = VLLM_NUM_BUFFERS

    def __post_init__(self) -> None:
        if self.version < (0, 25):
            raise BridgeError(f"vLLM {self.version[0]}.{self.version[1]} has no NCCL weight transfer to stream into; "
                              "use vLLM >= 0.25.1")
        if self.buffer_bytes < 1 or self.num_buffers < 1:
            raise BridgeError(f"bucket_bytes and the buffer count must be positive, got {self.buffer_bytes}, "
                              f"{self.num_buffers}")

    @property
    def unique_id(self) -> bool:
        """Whether the rendezvous is a pre-shared unique id (0.30+) rather than vLLM's store."""
        return self.version >= (0, 30)

    def _packing(self) -> dict[str, Any]:
        return {"packed": True, "packed_buffer_size_bytes": self.buffer_bytes, "packed_num_buffers": self.num_buffers}

    def init_info(self, world_size: int, *, master_address: str | None = None, master_port: int | None = None,
                  uid_b64: str | None = None) -> dict[str, Any]:
        info: dict[str, Any] = {"rank_offset": 1, "world_size": world_size}
        if uid_b64 is not None:
            info["nccl_unique_id_b64"] = uid_b64
        else:
            info.update(master_address=master_address, master_port=master_port)
        if self.version >= (0, 28):
            info.update(self._packing())
        return info

    def update_info(self, plan: StreamPlan) -> dict[str, Any]:
        info: dict[str, Any] = {"names": [s.name for s in plan.slots], "dtype_names": [s.dtype for s in plan.slots],
                                "shapes": [list(s.shape) for s in plan.slots]}
        if self.version < (0, 28):
            info.update(self._packing())
        return info


def hf_specs(model: nn.Module) -> Iterator[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The HF tensors vLLM's ``load_weights`` takes, in ``named_parameters`` order (a tied one once)."""
    for name, p in model.named_parameters():
        yield name, p.dtype, tuple(p.shape)


class StockStreamBridge(StreamBridge):
    """A trainer-owned HF model streaming into a stock vLLM engine's own NCCL receiver. Make one with
    :func:`ipcbridge.stream` (``receiver="vllm"``). Same ``update()``/``push()`` contract as
    :class:`StreamBridge`; the plan is in HF names, packed vLLM's way."""

    def __init__(self, control: Any, model: nn.Module, *, wire: StockWire, plan: StreamPlan, timeout: float,
                 host: str, lease_seconds: float, wait: float) -> None:
        self.wire = wire
        self._control = control
        self._update_info = wire.update_info(plan)
        super().__init__(control, model, control.weight_version, plan=plan, backend="nccl", timeout=timeout,
                         host=host, lease_seconds=lease_seconds, wait=wait)

    def _make_layout(self, plan: StreamPlan, model: nn.Module) -> Layout:
        params = dict(model.named_parameters(remove_duplicate=False))
        first: dict[int, str] = {}
        for name, p in model.named_parameters():
            first.setdefault(id(p), name)
        planned = {s.name for s in plan.slots}
        tied = tuple((n, first[id(p)]) for n, p in params.items() if n not in planned and id(p) in first)
        return Layout(params={n: (tuple(p.shape), p.dtype) for n, p in params.items()}, tied=tied,
                       zero=frozenset())

    def _pack(self, bucket: Bucket, out: torch.Tensor) -> None:
        pack(self._params, bucket, out)  # HF tensors as they are: vLLM's load_weights fuses them

    def _rendezvous(self, world: int) -> tuple[dict[str, Any], Callable[[PeerCheck], Any]]:
        """The init info for vLLM and the join of rank 0 that matches it. Note [vLLM's NCCL group]."""
        device = self._device
        if self.wire.unique_id:
            uid = mint_unique_id()
            return (self.wire.init_info(world, uid_b64=unique_id_b64(uid)),
                    lambda refused: open_torch_comm(uid, world, device, self.timeout, refused))
        port = free_port(self.host)
        return (self.wire.init_info(world, master_address=self.host, master_port=port),
                lambda refused: open_store_comm(self.host, port, world, device, self.timeout, refused))

    def _connect(self) -> None:
        info, join = self._rendezvous(1 + self._control.world_size())
        call = EngineCall(lambda: self._control.init(info), "init_weight_transfer_engine")
        try:
            group = join(lambda: call.error if call.done() else None)
        except BridgeError as e:
            raise call.failed(e, "opening vLLM's weight transfer", _FIX_CONFIG) from e
        call.finish(self.timeout, "opening vLLM's weight transfer", _FIX_CONFIG, abort=lambda: group.close(abort=True))
        self._group = group

    def _transfer(self, params: dict[str, torch.Tensor]) -> None:
        group = self._require_open()
        fix = ("The engine's weights may be partly updated and this stream is closed (vLLM's receiver may be left "
               "blocked: Note [the stock receiver's failures]). Fix: check the engine, then open a new stream")
        t0 = time.perf_counter()
        try:
            self._control.start()
        except BridgeError as e:  # nothing was sent: the group is still in step
            raise BridgeError(f"vLLM refused start_weight_update: {e}. {fix}") from e
        info = self._update_info
        call = EngineCall(lambda: self._control.update(info), "update_weights")
        nbytes = self._send(group, params, call, "streaming weights to vLLM", fix, self.timeout)
        self._control.finish()
        self.bytes_sent += nbytes
        self.push_seconds.append(time.perf_counter() - t0)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "receiver": "vllm", "vllm_version": ".".join(map(str, self.wire.version))}

    def close(self) -> None:
        """Leave vLLM's NCCL group. vLLM keeps its end until its next ``init_weight_transfer_engine``."""
        if self._closed:
            return
        self._closed = True
        self._close_group()
        self._control.close()
