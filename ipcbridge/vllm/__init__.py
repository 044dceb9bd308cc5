"""vLLM integration: a worker extension that exports the served weights, and endpoints that fence updates.

Start vLLM with the extension, then connect the trainer::

    llm = vllm.LLM(model, worker_extension_cls="ipcbridge.vllm.WorkerExtension", ...)
    bridge = ipcbridge.connect(llm)                        # or connect("http://host:8000") for `vllm serve`

Importing this package never imports vLLM (the extension class only touches vLLM objects it is handed), so
it works on machines without vLLM; the endpoints import vLLM when they are first used.
"""

from ipcbridge.vllm.extension import WorkerExtension

__all__ = ["WorkerExtension"]
