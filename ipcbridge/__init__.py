"""ipcbridge: train the very weights your inference engine serves, in place, with no second copy.

The public names load lazily (PEP 562): ``import ipcbridge`` imports no torch, so ``ipcbridge --version``
and ``except ipcbridge.MappingError`` stay cheap; the first access to, say, ``ipcbridge.connect`` imports
its module and caches the name in this module's globals.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# These two import no torch, so they stay eager: error classes must be catchable without the heavy modules.
from ipcbridge._version import __version__
from ipcbridge.errors import (
    BridgeError,
    EngineError,
    FenceError,
    IpcBridgeError,
    ManifestError,
    MappingError,
    PrecisionError,
    RequestError,
)

if TYPE_CHECKING:  # real imports, for type checkers and IDEs only
    from ipcbridge import mapping, optim
    from ipcbridge.attach import attach
    from ipcbridge.bridge import Bridge, CheckReport, PrecisionWarning, connect
    from ipcbridge.checkpoint import save_pretrained
    from ipcbridge.engine import GenerateOutput, LocalEngine
    from ipcbridge.handles import export, open_manifest
    from ipcbridge.manifest import Manifest
    from ipcbridge.stream import StreamBridge, stream

# public name -> the module that defines it; a name equal to its module's last part is the submodule itself
_LAZY: dict[str, str] = {
    "mapping": "ipcbridge.mapping",
    "optim": "ipcbridge.optim",
    "attach": "ipcbridge.attach",
    "Bridge": "ipcbridge.bridge",
    "CheckReport": "ipcbridge.bridge",
    "PrecisionWarning": "ipcbridge.bridge",
    "connect": "ipcbridge.bridge",
    "save_pretrained": "ipcbridge.checkpoint",
    "GenerateOutput": "ipcbridge.engine",
    "LocalEngine": "ipcbridge.engine",
    "export": "ipcbridge.handles",
    "open_manifest": "ipcbridge.handles",
    "Manifest": "ipcbridge.manifest",
    "StreamBridge": "ipcbridge.stream",
    "stream": "ipcbridge.stream",
}
# names that are submodules, not attributes of a module
_SUBMODULES = {"mapping", "optim"}
# public functions that share their module's name: ipcbridge.attach is attach.attach, ipcbridge.stream is
# stream.stream, as in the eager __init__ this replaces
_SHADOWED = {"attach", "stream"}


def __getattr__(name: str) -> Any:
    modname = _LAZY.get(name)
    if modname is None:
        raise AttributeError(f"module 'ipcbridge' has no attribute {name!r}")
    module = importlib.import_module(modname)
    value = module if name in _SUBMODULES else getattr(module, name)
    globals()[name] = value  # cache: the next access skips __getattr__
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # The import system binds every newly loaded submodule on its parent (setattr(ipcbridge, "attach",
        # <module>)) whenever *any* code imports it, e.g. bridge.py's ``from ipcbridge.attach import ...``.
        # That would hide the public function ``ipcbridge.attach``; drop the binding so __getattr__ serves
        # the function. ``from ipcbridge.attach import x`` still works (it reads sys.modules).
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
    "RequestError",
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
