"""ipcbridge: train the very weights your inference engine serves, in place, with no second copy."""

from ipcbridge import mapping, optim
from ipcbridge._version import __version__
from ipcbridge.attach import attach
from ipcbridge.bridge import Bridge, CheckReport, PrecisionWarning, connect
from ipcbridge.checkpoint import save_pretrained
from ipcbridge.engine import GenerateOutput, LocalEngine
from ipcbridge.errors import (
    BridgeError,
    EngineError,
    FenceError,
    IpcBridgeError,
    ManifestError,
    MappingError,
    PrecisionError,
)
from ipcbridge.handles import export, open_manifest
from ipcbridge.manifest import Manifest
from ipcbridge.stream import StreamBridge, stream

__all__ = [
    "Bridge",
    "BridgeError",
    "CheckReport",
    "EngineError",
    "FenceError",
    "GenerateOutput",
    "IpcBridgeError",
    "LocalEngine",
    "Manifest",
    "ManifestError",
    "MappingError",
    "PrecisionError",
    "PrecisionWarning",
    "StreamBridge",
    "__version__",
    "attach",
    "connect",
    "export",
    "mapping",
    "open_manifest",
    "optim",
    "save_pretrained",
    "stream",
]
