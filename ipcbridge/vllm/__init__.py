"""vLLM integration: a worker extension that exports the served weights, and endpoints that fence updates.

Start vLLM with the extension, then connect the trainer::

    llm = vllm.LLM(model, worker_extension_cls="ipcbridge.vllm.WorkerExtension", ...)
    bridge = ipcbridge.connect(llm)                        # or connect("http://host:8000") for `vllm serve`

One concern per module:

* :mod:`~ipcbridge.vllm.policy`: which engines can be aliased (pure; Note [what cannot be aliased]);
* :mod:`~ipcbridge.vllm.rpc`: the JSON reply of every ``ipcbridge_*`` worker method, both sides;
* :mod:`~ipcbridge.vllm.extension`: :class:`WorkerExtension`, the production worker mixin (manifest,
  weight version, info);
* :mod:`~ipcbridge.vllm.testing`: ``TestingWorkerExtension``, a subclass adding weight re-initialisation
  and the copy-based baseline, for tests, demos and benchmarks;
* :mod:`~ipcbridge.vllm.base`, :mod:`~ipcbridge.vllm.endpoints`, :mod:`~ipcbridge.vllm.http`: the
  trainer's endpoints for ``vllm.LLM``, ``AsyncLLM`` and ``vllm serve``, on the leased fence;
* :mod:`~ipcbridge.vllm.colocate`: ``VllmEngine``, a ``vllm.LLM`` with the embedded engine's interface.

Importing this package never imports vLLM (the extension class only touches vLLM objects it is handed), so
it works on machines without vLLM; the endpoints import vLLM when they are first used.
"""

from ipcbridge.vllm.extension import WorkerExtension
from ipcbridge.vllm.http import HttpEndpoint  # standard library only: never imports vLLM

__all__ = ["HttpEndpoint", "WorkerExtension"]
