"""Streaming: the fallback where the engine's memory cannot be shared, so the trainer broadcasts its own weights.

One module per concern, in dependency order:

- :mod:`~ipcbridge.stream.plan`: the :class:`StreamPlan` (where every tensor lies in the flat buffers; crosses
  processes as JSON) and the pure :func:`pack`/:func:`unpack`.
- :mod:`~ipcbridge.stream.protocol`: :func:`send`/:func:`receive`, the double-buffered protocol over any group.
- :mod:`~ipcbridge.stream.group`: :class:`TorchGroup`, a private two-rank gloo or NCCL process group.
- :mod:`~ipcbridge.stream.receiver`: the engine's side (``StreamReceiver``).
- :mod:`~ipcbridge.stream.bridge`: the trainer's side, :func:`stream` and :class:`StreamBridge`.

Once :mod:`ipcbridge` is imported, its attribute ``stream`` is the function :func:`stream`, which shadows this
package. Import the submodules with ``from``: ``from ipcbridge.stream.plan import StreamPlan`` or
``from ipcbridge.stream import plan``. Whatever walks attributes from ``ipcbridge`` (``import
ipcbridge.stream.plan as p``, ``monkeypatch.setattr("ipcbridge.stream.group.x", ...)``) reaches the function.
"""

from ipcbridge.stream.bridge import StreamBridge, stream
from ipcbridge.stream.group import TorchGroup
from ipcbridge.stream.plan import DEFAULT_BUCKET_BYTES, Bucket, Slot, StreamPlan, pack, plan_buckets, unpack
from ipcbridge.stream.protocol import receive, send

__all__ = [
    "DEFAULT_BUCKET_BYTES", "Bucket", "Slot", "StreamBridge", "StreamPlan", "TorchGroup", "pack", "plan_buckets",
    "receive", "send", "stream", "unpack",
]
