"""``VllmEngine``: a real ``vllm.LLM`` next to the trainer, with the embedded engine's interface.

The demo and the examples treat both engines alike::

    with VllmEngine(LlamaConfig(...)) as engine:        # dummy weights when there is no checkpoint
        bridge = ipcbridge.connect(engine)               # via engine.ipcbridge_endpoint()
        outs = engine.generate([[1, 2, 3]], max_tokens=16, temperature=1.0)
        ...
        with bridge.update():
            optimizer.step()

Ownership: the EngineCore child process owns the weights. Close the bridge (``bridge.close()``) before the
engine exits; ``VllmEngine.__exit__`` releases this process's CUDA IPC mappings before shutting vLLM down.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
from typing import Any

from ipcbridge.engine.types import GenerateOutput
from ipcbridge.errors import BridgeError, MappingError
from ipcbridge.hf import config_value, head_dim, write_model_dir
from ipcbridge.vllm.base import check_kv_reset
from ipcbridge.vllm.extension import EXTENSION_QUALNAME, extension_class, is_ipcbridge_extension
from ipcbridge.vllm.testing import TESTING_EXTENSION_QUALNAME, TestingWorkerExtension

logger = logging.getLogger(__name__)


def _head_dim(config: Any) -> int:
    try:
        return head_dim(config)
    except MappingError:
        return 64  # vLLM reports a malformed config itself, with its own message


class VllmEngine:
    """A ``vllm.LLM`` started with ipcbridge's worker extension; a context manager.

    ``config_or_path``: a model directory/hub id (real weights), or a transformers config / config dict
    (written to a temporary directory; vLLM then initialises dummy weights). Every ``**llm_kwargs`` goes to
    ``vllm.LLM`` and overrides the defaults here (eager mode, no tokenizer, token ids in and out, Triton
    attention, a small memory share so the trainer fits on the same GPU).

    ``init`` (bare configs only): ``"hf"`` overwrites vLLM's dummy weights (uniform in [-1e-3, 1e-3], norms
    included, so every logit is ~0) with an HF-style init from ``seed`` (norms 1, biases 0, the rest
    N(0, ``initializer_range``)), like the embedded engine's random weights; ``"dummy"`` keeps vLLM's.

    ``num_gpu_blocks`` caps vLLM's KV cache (blocks of 16 tokens; 4096 = 65k tokens); ``None`` lets vLLM
    size it from ``gpu_memory_utilization``. ``kv_reset`` (Note [stale KV: reset or salt] in
    :mod:`ipcbridge.vllm.base`): ``"salted"``, the default here, skips vLLM's ``reset_prefix_cache``
    (which walks every KV block in Python, ~35 ms for 637k blocks) because :meth:`generate` salts every
    request with the weight version; requests sent to ``engine.llm`` directly must then carry
    ``cache_salt=engine.ipcbridge_endpoint().cache_salt()``, or pass ``kv_reset="always"``.
    """

    def __init__(self, config_or_path: Any, *, gpu_memory_utilization: float = 0.3, seed: int = 0,
                 max_model_len: int = 512, num_gpu_blocks: int | None = 4096, init: str = "hf",
                 kv_reset: str = "salted", **llm_kwargs: Any) -> None:
        if init not in ("hf", "dummy"):
            raise ValueError(f"init must be 'hf' or 'dummy', got {init!r}")
        self.kv_reset = check_kv_reset(kv_reset)
        self.config_or_path = config_or_path
        self.init = init
        self.gpu_memory_utilization = gpu_memory_utilization
        self.num_gpu_blocks = num_gpu_blocks
        self.seed = seed
        self.max_model_len = max_model_len
        self.llm_kwargs = llm_kwargs
        self.llm: Any = None
        #: Where the weights live (as the embedded engine's ``device``): vLLM's one GPU.
        self.device = "cuda"
        self._tmpdir: str | None = None
        self._endpoint: Any = None

    @property
    def weight_version(self) -> int:
        """The weight version this engine's endpoint last saw (its manifest's, then each fence's resume)."""
        return 0 if self._endpoint is None else self._endpoint.weight_version

    @property
    def reinit(self) -> bool:
        """Whether :meth:`start` overwrites vLLM's dummy weights (``init="hf"`` on a bare config)."""
        return not isinstance(self.config_or_path, str) and self.init == "hf"

    def llm_kwargs_for_start(self) -> tuple[str, dict[str, Any]]:
        """(model, ``vllm.LLM`` keyword arguments); writes a bare config to a temporary model directory.

        The worker extension is :class:`~ipcbridge.vllm.testing.TestingWorkerExtension` when the weights
        must be re-initialised, :class:`~ipcbridge.vllm.WorkerExtension` otherwise; ``llm_kwargs`` may name
        any subclass of it.
        """
        kwargs: dict[str, Any] = {
            "worker_extension_cls": TESTING_EXTENSION_QUALNAME if self.reinit else EXTENSION_QUALNAME,
            "enforce_eager": True,
            "skip_tokenizer_init": True,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len,
            "seed": self.seed,
            "attention_backend": "TRITON_ATTN",
        }
        if self.num_gpu_blocks is not None:
            kwargs["num_gpu_blocks_override"] = self.num_gpu_blocks
        if isinstance(self.config_or_path, str):
            model = self.config_or_path
        else:
            # vLLM refuses a max_model_len beyond the config's positions; tiny demo configs have few.
            limit = config_value(self.config_or_path, "max_position_embeddings", None)
            if isinstance(limit, int) and limit < kwargs["max_model_len"]:
                kwargs["max_model_len"] = limit
            # vLLM's Triton attention needs head_dim >= 32; FlexAttention takes any (slower, fine for toys).
            if _head_dim(self.config_or_path) < 32:
                kwargs["attention_backend"] = "FLEX_ATTENTION"
            if self._tmpdir is None:
                self._tmpdir = tempfile.mkdtemp(prefix="ipcbridge-vllm-")
            model = write_model_dir(self.config_or_path, self._tmpdir)
            kwargs["load_format"] = "dummy"
        kwargs.update(self.llm_kwargs)
        self._check_extension(kwargs.get("worker_extension_cls"))
        return model, kwargs

    def _check_extension(self, ext: Any) -> None:
        if not is_ipcbridge_extension(ext):
            raise BridgeError(
                f"VllmEngine needs worker_extension_cls={EXTENSION_QUALNAME!r} or a subclass of it, got {ext!r}"
            )
        cls = extension_class(ext)
        if self.reinit and not (cls is not None and issubclass(cls, TestingWorkerExtension)):
            raise BridgeError(
                f"VllmEngine(init='hf') re-initialises the weights through {TESTING_EXTENSION_QUALNAME}, but "
                f"worker_extension_cls={ext!r}; pass init='dummy', or leave worker_extension_cls unset"
            )

    def start(self) -> VllmEngine:
        from vllm import LLM

        model, kwargs = self.llm_kwargs_for_start()
        logger.info("starting vllm.LLM(%s) with %s", model, kwargs)
        self.llm = LLM(model=model, **kwargs)
        if self.reinit:
            std = config_value(self.config_or_path, "initializer_range", None) or 0.02
            self.ipcbridge_endpoint().rpc("ipcbridge_init_weights", self.seed, float(std))
        return self

    def ipcbridge_endpoint(self) -> Any:
        """The endpoint ``ipcbridge.connect(engine)`` uses: the LLM's (one per engine, so versions agree)."""
        if self.llm is None:
            raise BridgeError("VllmEngine is not started; use it as a context manager or call start()")
        if self._endpoint is None:
            from ipcbridge.vllm.endpoints import LLMEndpoint

            self._endpoint = LLMEndpoint(self.llm, kv_reset=self.kv_reset)
        return self._endpoint

    def generate(self, prompts: list[list[int]], max_tokens: int = 16, temperature: float = 0.0,
                 seed: int | None = None) -> list[GenerateOutput]:
        """Sample from token ids: tokens, vLLM's logprob of each sampled token, and the weight version.

        ``seed`` makes the call reproducible; without it vLLM's own generator (seeded once by ``seed=`` at
        start) is used. See :meth:`LLMEndpoint.generate` for the per-prompt seeds.
        """
        results = self.ipcbridge_endpoint().generate_versioned(prompts, max_tokens, temperature, seed)
        return [GenerateOutput(token_ids=t, logprobs=lp, weight_version=v) for t, lp, v in results]

    def close(self) -> None:
        """Release this process's IPC mappings, then shut the engine down. Safe to call twice."""
        import torch

        if self.llm is not None:
            gc.collect()  # drop views of the engine's memory held by garbage (closed bridges, old models)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.ipc_collect()
            llm, self.llm, self._endpoint = self.llm, None, None
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # shutting down must not hide the exception that got us here
                logger.warning("vLLM shutdown raised %s", e)
            del llm
            gc.collect()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> VllmEngine:
        try:
            return self.start()
        except BaseException:
            self.close()  # a half-started engine: no leaked EngineCore process or temporary directory
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
