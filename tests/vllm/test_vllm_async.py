"""Real vLLM (0.25.1 / 0.26.0) ``AsyncLLM`` in-process: connect from a worker thread, update while requests are
in flight.

The fence is the engine core's ``mode="wait"`` pause (Note [the AsyncLLM pause]): requests running at the pause finish on the old weights, those
arriving during the update are held and run on the new ones. Every completion must equal the HF model's
greedy continuation under exactly one of the two weight versions, and requests sent from inside the fence
must see the new one. (From vLLM 0.33 requests sent during the fence are rejected instead; not run here.)
"""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from typing import Any

import pytest

import ipcbridge
from tests.vllm import vllm_helpers as H

pytestmark = pytest.mark.vllm

PROMPTS = H.PROMPTS
N_TOKENS = 48


def _init(bridge: Any) -> None:
    with bridge.update():
        H.init_weights(bridge.model, seed=0)


def test_async_llm_update_in_flight() -> None:
    H.require_vllm()
    import torch
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from ipcbridge.hf import write_model_dir
    from ipcbridge.vllm.endpoints import AsyncLLMEndpoint
    from ipcbridge.vllm.extension import EXTENSION_QUALNAME

    model_dir = write_model_dir(H.tiny_config("llama"), tempfile.mkdtemp(prefix="ipcbridge-async-"))
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False)

    async def main() -> dict:
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=model_dir, load_format="dummy", skip_tokenizer_init=True, enforce_eager=True,
            gpu_memory_utilization=0.25, max_model_len=512, attention_backend="TRITON_ATTN", seed=0,
            num_gpu_blocks_override=4096,
            worker_extension_cls=EXTENSION_QUALNAME,
        ))
        loop = asyncio.get_running_loop()
        bridge = None
        try:
            async def gen(prompt: list[int]) -> list[int]:
                final = None
                async for out in engine.generate({"prompt_token_ids": prompt}, params, request_id=uuid.uuid4().hex):
                    final = out
                return list(final.outputs[0].token_ids)

            # Calling the endpoint on the loop's own thread must be refused, not deadlock.
            with pytest.raises(ipcbridge.BridgeError, match="to_thread"):
                AsyncLLMEndpoint(engine).manifest()

            bridge = await asyncio.to_thread(ipcbridge.connect, engine, check=True)
            report = await asyncio.to_thread(bridge.check)
            await asyncio.to_thread(_init, bridge)
            await asyncio.to_thread(H.decisive_step, bridge, PROMPTS, 555)  # the "old" weights: confident
            old_model = H.snapshot(bridge.model)
            old = [H.hf_greedy(bridge.model, p, N_TOKENS) for p in PROMPTS]
            served_old = list(await asyncio.gather(*(gen(p) for p in PROMPTS)))

            early = [asyncio.create_task(gen(p)) for p in PROMPTS for _ in range(2)]
            await asyncio.sleep(0.05)  # let them start decoding
            in_flight = sum(not t.done() for t in early)
            late: list[Any] = []

            def send_late() -> None:  # runs inside the fence, on the trainer's thread
                late.extend(asyncio.run_coroutine_threadsafe(gen(p), loop) for p in PROMPTS)

            await asyncio.to_thread(H.decisive_step, bridge, PROMPTS, 888, 2e-2, send_late)
            early_res = await asyncio.gather(*early)
            late_res = [await asyncio.wrap_future(f) for f in late]
            new = [H.hf_greedy(bridge.model, p, N_TOKENS) for p in PROMPTS]
            engine_version = await asyncio.to_thread(bridge.endpoint.engine_weight_version)
            models = {"old": old_model, "new": bridge.model}

            def cls(res: list[int], i: int) -> dict:
                return H.classify(res, PROMPTS[i], {"old": old[i], "new": new[i]}, models)

            return {
                "parity_mean": report.logprob_mean_abs_diff, "parity_max": report.logprob_max_abs_diff,
                "served_old_equals_hf": served_old == old, "old_ne_new": old != new,
                "in_flight_at_pause": in_flight,
                "early": [cls(r, i // 2) for i, r in enumerate(early_res)],
                "late": [cls(r, i) for i, r in enumerate(late_res)],
                "old": old, "new": new, "late_tokens": late_res,
                "weight_version": bridge.weight_version, "engine_version": engine_version,
                "fence_ms": [round(1e3 * s, 2) for s in bridge.fence_seconds],
            }
        finally:
            if bridge is not None:
                bridge.close()
            torch.cuda.ipc_collect()
            engine.shutdown()

    res = asyncio.run(main())
    H.record("async_llm_in_flight", **res)
    labels = [c["label"] for c in res["early"] + res["late"]]
    exact = sum(bool(c["exact"]) for c in res["early"] + res["late"])
    H.record("async_llm_summary", labels=labels, exact=f"{exact}/{len(labels)}")
    assert res["served_old_equals_hf"]
    assert res["old_ne_new"]
    assert "mix" not in labels
    assert [c["label"] for c in res["late"]] == ["new"] * len(PROMPTS)
    assert res["weight_version"] == res["engine_version"]
