"""The embedded default engine: a small inference process holding an HF model's weights in vLLM's layout."""

from ipcbridge.engine.client import LocalEndpoint, LocalEngine
from ipcbridge.engine.types import GenerateOutput

__all__ = ["GenerateOutput", "LocalEndpoint", "LocalEngine"]
