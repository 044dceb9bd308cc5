"""Streaming: the fallback where the engine's memory cannot be shared, so the trainer broadcasts its own weights.

One module per concern, in dependency order:

- :mod:`~ipcbridge.stream.plan`: the :class:`StreamPlan` (where every tensor lies in the flat buffers; crosses
  processes as JSON) and the pure :func:`pack`/:func:`unpack`.
- :mod:`~ipcbridge.stream.protocol`: :func:`send`/:func:`receive`, the double-buffered protocol over any group.
- :mod:`~ipcbridge.stream.group`: :class:`TorchGroup`, a private two-rank gloo or NCCL process group.
- :mod:`~ipcbridge.stream.receiver`: the engine's side (``StreamReceiver``).
- :mod:`~ipcbridge.stream.calls`: the engine's half of a stream step, an RPC run beside the trainer's.
- :mod:`~ipcbridge.stream.bridge`: the trainer's side, :class:`StreamBridge` (into ipcbridge's receivers).
- :mod:`~ipcbridge.stream.nccl`: a bare NCCL communicator as a group, and vLLM's rendezvous.
- :mod:`~ipcbridge.stream.controls` and :mod:`~ipcbridge.stream.stock`: the trainer's side of vLLM's own
  NCCL receiver (:class:`StockStreamBridge`), wire compatible with stock vLLM.
- :mod:`~ipcbridge.stream.ipc`: one GPU, memory that cannot be shared (vLLM sleep mode): both sides of a
  stream through a trainer-owned CUDA IPC buffer (:class:`IpcStreamBridge`), no NCCL.
- :mod:`~ipcbridge.stream.api`: :func:`stream`, which picks the receiver.

Once :mod:`ipcbridge` is imported, its attribute ``stream`` is the function :func:`stream`, which shadows this
package. Import the submodules with ``from``: ``from ipcbridge.stream.plan import StreamPlan`` or
``from ipcbridge.stream import plan``. Whatever walks attributes from ``ipcbridge`` (``import
ipcbridge.stream.plan as p``, ``monkeypatch.setattr("ipcbridge.stream.group.x", ...)``) reaches the function.
"""

from ipcbridge.stream.api import stream
from ipcbridge.stream.bridge import StreamBridge
from ipcbridge.stream.group import TorchGroup
from ipcbridge.stream.ipc import IpcStreamBridge
from ipcbridge.stream.plan import (
    DEFAULT_BUCKET_BYTES,
    Bucket,
    Slot,
    StreamPlan,
    pack,
    plan_buckets,
    plan_vllm_chunks,
    unpack,
)
from ipcbridge.stream.protocol import receive, send
from ipcbridge.stream.stock import StockStreamBridge

__all__ = [
    "DEFAULT_BUCKET_BYTES", "Bucket", "IpcStreamBridge", "Slot", "StockStreamBridge", "StreamBridge", "StreamPlan", "TorchGroup", "pack",
    "plan_buckets", "plan_vllm_chunks", "receive", "send", "stream", "unpack",
]
