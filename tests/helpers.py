"""What the tests share: one tiny config, one reference model, the weights an engine would hold, and the
stream tests' tensors and two-rank runner. Imported as ``from tests.helpers import ...``."""

from __future__ import annotations

import torch


def tiny_config(model_type: str = "llama", tied: bool = False, **overrides):
    """A tiny decoder config; vocab 100 is not a multiple of 64, so vLLM's padding is exercised."""
    from transformers import AutoConfig

    kw = dict(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=tied,
    )
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def reference_model(config, seed: int = 0, scale: float = 0.02):
    """An fp32 HF model with every parameter perturbed by N(0, ``scale``): norms start at ones and Gemma's
    at zeros, biases at zeros, which would hide a mapping that swaps or drops them."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def vllm_weights(model, config) -> dict[str, torch.Tensor]:
    from ipcbridge.mapping import to_vllm

    return {k: t.detach().clone() for k, t in to_vllm(dict(model.state_dict()), config).items()}


class RecordingEndpoint:
    """An in-process :class:`~ipcbridge.endpoints.Endpoint` that serves ``manifest`` and records every call
    after it (pause, renew, resume, cancel, close); ``resume`` publishes ``version``."""

    def __init__(self, manifest, version: int = 41, name: str = "recording") -> None:
        self._m, self.version, self.name, self.calls = manifest, version, name, []

    def manifest(self):
        return self._m

    def pause(self, lease, wait: float) -> None:
        self.calls.append("pause")

    def renew(self, lease) -> None:
        self.calls.append("renew")

    def resume(self, lease) -> int:
        self.calls.append("resume")
        return self.version  # the engine owns the version

    def cancel(self, lease) -> None:
        self.calls.append("cancel")

    def close(self) -> None:
        self.calls.append("close")


# ---- weight streaming (tests/stream) ----------------------------------------------------------------------


def mixed_tensors() -> dict[str, torch.Tensor]:
    """One tensor of every awkward kind a stream must carry: odd sizes, 0-d, empty, 1-byte and 8-byte dtypes."""
    return {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "f16": torch.randn(2, 3, 3).to(torch.float16),
        "i64": torch.arange(5, dtype=torch.int64) * 10**12,
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "u8": torch.arange(1, 200, dtype=torch.uint8),
    }


def run_pair(send_fn, receive_fn, timeout: float = 30.0):
    """Run the two ranks of a stream in two threads; ``(send's result, receive's result)``, an exception
    standing in for the result of a rank that raised."""
    import threading

    results = {}

    def run(key, fn) -> None:
        try:
            results[key] = fn()
        except Exception as e:
            results[key] = e

    threads = [threading.Thread(target=run, args=(k, f)) for k, f in (("send", send_fn), ("receive", receive_fn))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return results.get("send"), results.get("receive")
