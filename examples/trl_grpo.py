"""TRL's GRPOTrainer training the weights the engine serves, on CPU in well under a minute.

A tiny random Qwen2 in the embedded engine (its own process, weights in /dev/shm), a word-level
tokenizer built here (no model hub), and a toy reward: the share of completion tokens that are the
word "bridge". TRL does everything else (GRPO groups, advantages, its loss, the engine's logprobs for
its importance-sampling correction); ipcbridge makes the optimizer step *be* the weight update, so
TRL's per-step weight sync shrinks to a version check.

    python examples/trl_grpo.py            # ~25 steps; prints the reward per step, then a summary
    python examples/trl_grpo.py --steps 8  # shorter (the test runs this)

Needs ``pip install trl`` (1.16).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch

import ipcbridge

WORDS = ["<pad>", "<eos>", "the", "a", "engine", "trainer", "serves", "trains", "weights", "memory", "copy", "no",
         "one", "bridge", "fast", "slow", "model", "token", "step", "update", "fence", "pause", "resume", "version",
         "shared", "view", "same", "bytes", "gpu", "cpu", "learns", "reward", "rises", "in", "place", "with", "every",
         "while", "and", "or", "not", "yes", "so", "then", "now", "here", "there", "it", "is", "are", "we", "you",
         "they", "this", "that", "what", "all", "some", "good", "new", "up", "down", "open", "close"]
TARGET = "bridge"
PROMPTS = ["the engine serves", "we can write", "the trainer trains", "one copy of the weights", "this is new",
           "what the model says", "every step is", "the reward rises"]


def tokenizer() -> Any:
    """A word-level tokenizer over :data:`WORDS`, built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="the"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="the")


def model_config() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)


def target_share(completion_ids: list[list[int]], **_: Any) -> list[float]:
    """The reward: the share of each completion's tokens that are the target word."""
    target = WORDS.index(TARGET)
    return [sum(t == target for t in ids) / max(1, len(ids)) for ids in completion_ids]


def run(steps: int = 25, seed: int = 0, output_dir: str | None = None, lr: float = 3e-2) -> dict[str, Any]:
    """GRPO for ``steps`` steps; the reward per step, TRL's sync times and the engine's final weight version."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig

    from ipcbridge.integrations.trl import GRPOTrainer

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with ipcbridge.LocalEngine(model_config(), device="cpu", seed=seed) as engine, \
            tempfile.TemporaryDirectory() as tmp:
        bridge = ipcbridge.connect(engine)
        args = GRPOConfig(
            output_dir=output_dir or tmp, use_vllm=True, max_steps=steps, learning_rate=lr, seed=seed,
            per_device_train_batch_size=16, num_generations=8, max_completion_length=8, temperature=1.0,
            beta=0.0, use_cpu=True, bf16=False, logging_steps=1, report_to=[], save_strategy="no",
            disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(bridge, reward_funcs=target_share, args=args,
                              train_dataset=Dataset.from_dict({"prompt": PROMPTS * 64}),
                              processing_class=tokenizer())
        trainer.remove_callback(PrinterCallback)  # main() prints its own table
        trainer.train()
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        result = {"rewards": rewards, "sync_seconds": trainer.generation.sync_seconds,
                  "weight_version": engine.weight_version, "bridge_version": bridge.weight_version,
                  "is_ratio": [h.get("sampling/importance_sampling_ratio/mean") for h in trainer.state.log_history
                               if "reward" in h],
                  "seconds": time.perf_counter() - t0}
        bridge.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module="trl")
    torch.set_num_threads(2)
    r = run(args.steps, args.seed)
    for i, reward in enumerate(r["rewards"]):
        print(f"step {i:3d}  reward {reward:.3f}")
    first, last = statistics.fmean(r["rewards"][:3]), statistics.fmean(r["rewards"][-3:])
    sync = statistics.median(r["sync_seconds"]) * 1e3 if r["sync_seconds"] else float("nan")
    print(f"\nreward: first 3 steps {first:.3f} -> last 3 {last:.3f}; engine weight version {r['weight_version']}; "
          f"median sync_weights {sync:.2f} ms; {r['seconds']:.1f} s in all")


if __name__ == "__main__":
    main()
