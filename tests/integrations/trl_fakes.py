"""A fake ``vllm serve`` whose ``/v1/completions`` really samples, for TRL's generation over HTTP on CPU.

``CompletionsServe`` is ``tests.vllm.vllm_fakes.FakeServe`` (dev routes, ``/collective_rpc`` to a fake worker
holding vLLM-layout CPU tensors in shm) with a ``/v1/completions`` that answers as vLLM 0.25.1-0.33 does
(``CompletionRequest``/``CompletionResponse`` read from each release): token-id prompts, ``n``, temperature,
top-p, top-k, stop/EOS ids, ``logprobs`` in ``processed_logprobs`` mode with ``"token_id:<id>"`` keys,
``token_ids``/``prompt_token_ids``, and 0.33's ``weight_versions`` and 503 while paused. It samples from
``policy``, an HF model holding the worker's very weights (a second bridge's views), so TRL's
importance-sampling ratio is 1. Not a test module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

import ipcbridge
from ipcbridge.engine.inputs import Sampling
from ipcbridge.engine.sampling import sample_tokens
from tests.vllm import vllm_fakes as F


class CompletionsServe(F.FakeServe):
    """``FakeServe`` sampling from ``policy`` (set it before the first completion). ``busy`` answers that
    many completions with 503 first (a server paused by someone else's fence)."""

    def __init__(self, worker: Any, release: str = "0.25", dev_mode: bool = True) -> None:
        super().__init__(worker, dev_mode=dev_mode, release=release)
        self.policy: Any = None
        self.eos: list[int] = []
        self.busy = 0
        self.seed = 0
        self.logprobs_mode = "processed_logprobs"  # what GET /server_info?config_format=json reports

    def answer(self, path: str, query: dict[str, str], body: Any) -> tuple[int, bytes]:
        if path == "/server_info" and self.dev_mode:
            config = {"model_config": {"logprobs_mode": self.logprobs_mode}}
            return 200, json.dumps({"vllm_config": config, "vllm_env": {}, "system_env": {}}).encode()
        return super().answer(path, query, body)

    def _complete(self, body: dict[str, Any]) -> tuple[int, bytes]:
        if (self.paused and F.at_least(self.release, "0.33")) or self.busy > 0:
            self.busy = max(0, self.busy - 1)
            return 503, b'{"error":{"message":"the engine is paused; retry","type":"ServiceUnavailableError","code":503}}'
        self.completion_bodies.append(body)
        prompts = body["prompt"] if body["prompt"] and isinstance(body["prompt"][0], list) else [body["prompt"]]
        choices = []
        for prompt in prompts:
            for tokens, lps, tops, reason in self._sample(prompt, body):
                choices.append(self._choice(len(choices), prompt, tokens, lps, tops, reason, body))
        return 200, json.dumps({"id": "cmpl-fake", "object": "text_completion", "model": "fake",
                                "choices": choices}).encode()

    @torch.no_grad()
    def _sample(self, prompt: list[int], body: dict[str, Any]) -> list[tuple[list[int], list[float], list[Any], str]]:
        """``n`` rows decoded as one batch (full recompute per token: tiny models), each cut at its first stop."""
        n, temp, k = int(body.get("n", 1)), float(body.get("temperature", 1.0)), body.get("logprobs")
        sampling = Sampling(top_p=float(body.get("top_p", 1.0)), top_k=int(body.get("top_k") or 0), logprobs="processed")
        stops = set(body.get("stop_token_ids") or []) | (set() if body.get("ignore_eos") else set(self.eos))
        gen = torch.Generator().manual_seed(body.get("seed", self.seed))
        self.seed += 1
        ids = torch.tensor([prompt] * n)
        toks, lps, tops = [], [], []
        for _ in range(int(body["max_tokens"])):
            logits = self.policy(ids).logits[:, -1].float()
            t, lp = sample_tokens(logits, temp, sampling, gen)
            ids = torch.cat([ids, t[:, None]], 1)
            toks.append(t.tolist())
            lps.append(lp.tolist())
            if k:
                full = torch.log_softmax(logits / temp, -1).topk(k, -1)
                tops.append([dict(zip(i.tolist(), v.tolist(), strict=True)) for v, i in zip(*full, strict=True)])
        out = []
        for r in range(n):
            row = [step[r] for step in toks]
            end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            top = [{**tops[i][r], row[i]: lps[i][r]} for i in range(end)] if k else [{row[i]: lps[i][r]}
                                                                                      for i in range(end)]
            out.append((row[:end], [step[r] for step in lps][:end], top, "stop" if end < len(row) else "length"))
        return out

    def _choice(self, index: int, prompt: list[int], tokens: list[int], lps: list[float], tops: list[Any],
                reason: str, body: dict[str, Any]) -> dict[str, Any]:
        as_ids = body.get("return_tokens_as_token_ids")
        key = (lambda t: f"token_id:{t}") if as_ids else (lambda t: f"w{t}")
        choice: dict[str, Any] = {"index": index, "text": "", "finish_reason": reason, "stop_reason": None}
        if body.get("logprobs") is not None:
            choice["logprobs"] = {"text_offset": list(range(len(tokens))), "token_logprobs": lps,
                                  "tokens": [key(t) for t in tokens],
                                  "top_logprobs": [{key(t): max(v, -9999.0) for t, v in step.items()} for step in tops]}
        if body.get("return_token_ids"):
            choice["token_ids"], choice["prompt_token_ids"] = tokens, list(prompt)
        if body.get("return_weight_versions") and F.at_least(self.release, "0.33"):
            choice["weight_versions"] = [{"version": self.vllm_weight_version, "start": 0, "end": len(tokens)}]
        return choice


@contextmanager
def serving(config: Any, release: str = "0.25", eos: list[int] | None = None) -> Iterator[tuple[CompletionsServe, Any]]:
    """A running ``CompletionsServe`` of a fake worker serving ``config``'s weights, and the trainer's bridge
    to it by URL; the server samples from a second bridge's views of the same weights."""
    worker = F.make_worker(config)
    with CompletionsServe(worker, release=release) as srv:
        srv.eos = list(eos or [])
        bridge = ipcbridge.connect(srv.url)
        engine_view = ipcbridge.connect(srv.url)
        srv.policy = engine_view.model.eval()
        try:
            yield srv, bridge
        finally:
            bridge.close()
            engine_view.close()
