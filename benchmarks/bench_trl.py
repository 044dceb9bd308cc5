"""TRL's GRPOTrainer side by side on one GPU: TRL's own colocate mode vs TRL on ipcbridge.

Same model (Qwen2's architecture at 0.47 B parameters with random weights over a 64-word vocabulary, saved
locally in bf16 with a word-level tokenizer built here: no model hub; Note [a vocabulary a toy reward can
be learned in]), same ``GRPOConfig``, same toy reward (the share of completion tokens that are one target
word: 1/64 at random, 1.0 at best). Each column runs in its own process:

* ``trl``: ``trl.GRPOTrainer(model=<the HF model>, args=GRPOConfig(use_vllm=True, vllm_mode="colocate"))``;
  TRL starts its own in-process ``vllm.LLM`` and copies every parameter into it each step (``sync_weights``).
* ``ipcbridge``: ``colocated_llm`` starts the same ``vllm.LLM`` (TRL's own arguments), ``ipcbridge.connect``
  attaches the trainer to its tensors in-process, and ``ipcbridge.integrations.trl.GRPOTrainer`` trains them;
  ``sync_weights`` is a version check.

Rows: peak GPU memory (torch's peak in the process, which holds both the trainer and vLLM, and the
device's used memory), weight-sync time per step, total step time, the KV cache vLLM reports, the
reward curve. On the GPU machine (TRL and its missing dependencies from .trl-wheels)::

    source .vllm-bundle/install.sh && pip install --no-index --no-deps .trl-wheels/*.whl --target /tmp/trl-site \\
      && PYTHONPATH=/tmp/trl-site:$PYTHONPATH:. python3 benchmarks/bench_trl.py --json $OUT/bench_trl.json

``--tiny`` runs a tiny model (a smoke test of the script), ``--only trl|ipcbridge`` one column.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GIB = 2**30
COLUMNS = ("trl", "ipcbridge")


#: The rewarded token: the toy reward is the share of completion tokens equal to it (1/64 at random).
TARGET = 13


def qwen2_config(tiny: bool) -> Any:
    """Qwen2's architecture at 0.47 B parameters (Qwen2-0.5B's depth, a little wider) over a 64-word vocabulary.

    Note [a vocabulary a toy reward can be learned in]: a random model over Qwen2's 151,936 tokens samples
    almost uniformly (entropy 11.75 of 11.93 nats), and no toy reward moved in 30 GRPO steps in either column
    (measured, docs/trl.md); over 64 words one target token is sampled once per completion at random and its
    share climbs within a few steps (CPU: 0.01 -> 0.66 in 12 steps at lr 3e-4, a narrower model).
    """
    from transformers import Qwen2Config

    vocab = 64
    if tiny:
        return Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                           tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return Qwen2Config(vocab_size=vocab, hidden_size=1024, intermediate_size=5632, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True, rope_theta=1000000.0, pad_token_id=0, eos_token_id=1,
                       bos_token_id=None)


def write_model(path: Path, tiny: bool) -> None:
    """Random bf16 weights (seed 0) and a word-level tokenizer covering every id, saved to ``path``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    config = qwen2_config(tiny)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, config.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="w2",
                            model_max_length=config.max_position_embeddings).save_pretrained(path)
    # transformers 5's AutoTokenizer picks the model type's class (Qwen2's BPE), which decodes this vocabulary
    # but cannot encode with it: the trainer loads PreTrainedTokenizerFast itself, and vLLM only decodes
    # (TRL hands it token ids).


def target_share(completion_ids: list[list[int]], **_: Any) -> list[float]:
    """The toy reward: the share of each completion's tokens that are :data:`TARGET`."""
    return [sum(t == TARGET for t in ids) / max(1, len(ids)) for ids in completion_ids]


def grpo_config(out: str, a: argparse.Namespace) -> Any:
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out, use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=a.gpu_memory_utilization,
        vllm_max_model_length=a.max_model_len, max_steps=a.steps, learning_rate=a.lr, seed=0,
        per_device_train_batch_size=a.batch, num_generations=a.group, max_completion_length=a.completion,
        temperature=a.temperature, beta=0.0, bf16=True, lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
    )


def dataset(n: int, vocab: int) -> Any:
    import random

    from datasets import Dataset

    rng = random.Random(0)
    return Dataset.from_dict({"prompt": [" ".join(f"w{rng.randrange(2, vocab)}" for _ in range(8)) for _ in range(n)]})


class _Timer:
    """Times every call of ``obj.name`` (device-synchronised) into ``seconds``."""

    def __init__(self, obj: Any, name: str) -> None:
        import torch

        self.seconds: list[float] = []
        inner = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                torch.cuda.synchronize()
                self.seconds.append(time.perf_counter() - t0)

        setattr(obj, name, timed)


def _step_times() -> Any:
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self._t0 = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.seconds.append(time.perf_counter() - self._t0)

    return StepTimes()


def run_column(column: str, model_dir: Path, a: argparse.Namespace) -> dict[str, Any]:
    """One column, in this process: set up, train ``a.steps`` steps, measure."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    import ipcbridge

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)  # not AutoTokenizer: see write_model
    config = qwen2_config(a.tiny)
    data = dataset(a.batch * a.steps, config.vocab_size)
    weight_bytes = sum(p.numel() * 2 for p in AutoModelForCausalLM.from_config(config).parameters())
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        args = grpo_config(out, a)
        if column == "trl":
            import trl

            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
            trainer = trl.GRPOTrainer(model=model, reward_funcs=target_share, args=args, train_dataset=data,
                                      processing_class=tok)
        else:
            from ipcbridge.integrations.trl import GRPOTrainer, colocated_llm
            from ipcbridge.vllm.inprocess import InProcessLLMEndpoint

            # The KV cache TRL's column got, so that the memory rows compare like with like (left to itself,
            # vLLM gives the memory the trainer's copy no longer takes to its KV cache: --no-match-kv).
            llm = colocated_llm(str(model_dir), args, **({"num_gpu_blocks_override": a.kv_blocks}
                                                         if a.kv_blocks else {}))
            bridge = ipcbridge.connect(InProcessLLMEndpoint(llm))
            master = None if a.master_weights == "none" else a.master_weights
            trainer = GRPOTrainer(bridge, reward_funcs=target_share, args=args, train_dataset=data,
                                  processing_class=tok, master_weights=master)
        setup_seconds = time.perf_counter() - t0
        llm = trainer.vllm_generation.llm
        cache = llm.llm_engine.vllm_config.cache_config
        sync = _Timer(trainer.vllm_generation, "sync_weights")
        steps = _step_times()
        trainer.add_callback(steps)
        allocated_before_train = torch.cuda.memory_allocated()
        trainer.train()
        free, total = torch.cuda.mem_get_info()
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        is_ratio = [h.get("sampling/importance_sampling_ratio/mean") for h in trainer.state.log_history
                    if "reward" in h]
        return {
            "column": column, "setup_seconds": setup_seconds, "weight_bytes": weight_bytes,
            "peak_allocated": torch.cuda.max_memory_allocated(), "allocated_before_train": allocated_before_train,
            "device_used_after": total - free, "sync_seconds": sync.seconds, "step_seconds": steps.seconds,
            "kv_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
            "kv_tokens": (cache.num_gpu_blocks or 0) * cache.block_size, "rewards": rewards, "is_ratio": is_ratio,
        }


def _median(xs: list[float], skip_first: bool = True) -> float | None:
    xs = xs[1:] if skip_first and len(xs) > 1 else xs
    return statistics.median(xs) if xs else None


def table(results: dict[str, dict[str, Any]]) -> str:
    def cell(col: str, fn: Any) -> str:
        r = results.get(col)
        if r is None or "error" in r:
            return "failed" if r else "not run"
        return fn(r)

    def ms(x: float | None) -> str:
        return "n/a" if x is None else f"{x * 1e3:.2f} ms"

    def curve(r: dict[str, Any]) -> str:
        rw = r["rewards"]
        return f"{rw[0]:.3f} → {statistics.fmean(rw[-3:]):.3f} (last 3)" if rw else "n/a"

    rows = [
        ("peak GPU memory (torch, trainer + vLLM)", lambda r: f"{r['peak_allocated'] / GIB:.2f} GiB"),
        ("GPU memory used after training (device)", lambda r: f"{r['device_used_after'] / GIB:.2f} GiB"),
        ("weight-sync time per step (median)", lambda r: ms(_median(r["sync_seconds"]))),
        ("total step time (median)", lambda r: ms(_median(r["step_seconds"]))),
        ("KV cache vLLM reports", lambda r: f"{r['kv_blocks']} blocks = {r['kv_tokens']:,} tokens"),
        ("reward, step 0 → end", curve),
        ("importance-sampling ratio (mean of steps)",
         lambda r: f"{statistics.fmean(x for x in r['is_ratio'] if x is not None):.4f}" if any(
             x is not None for x in r["is_ratio"]) else "n/a"),
    ]
    lines = ["| | TRL colocate | TRL on ipcbridge |", "|---|---|---|"]
    lines += [f"| {name} | {cell('trl', fn)} | {cell('ipcbridge', fn)} |" for name, fn in rows]
    return "\n".join(lines)


def summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    t, b = results.get("trl", {}), results.get("ipcbridge", {})
    if "peak_allocated" not in t or "peak_allocated" not in b:
        return {}
    ts, bs = _median(t["sync_seconds"]), _median(b["sync_seconds"])
    return {"sync_speedup": ts / bs if ts and bs else None,
            "peak_saved_bytes": t["peak_allocated"] - b["peak_allocated"], "weight_bytes": b["weight_bytes"],
            "peak_saved_at_least_weights": t["peak_allocated"] - b["peak_allocated"] >= b["weight_bytes"],
            "ipcbridge_learns": statistics.fmean(b["rewards"][-3:]) > statistics.fmean(b["rewards"][:3]) + 0.1,
            "trl_learns": statistics.fmean(t["rewards"][-3:]) > statistics.fmean(t["rewards"][:3]) + 0.1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--only", choices=COLUMNS)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-4, help="large enough that bf16 weights move (no fp32 masters)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=32, help="per_device_train_batch_size (completions per step)")
    ap.add_argument("--group", type=int, default=8, help="num_generations")
    ap.add_argument("--completion", type=int, default=64, help="max_completion_length")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--master-weights", default="none", choices=("none", "remainder", "fp32", "stochastic"),
                    help="ipcbridge column only; 'none' trains bf16 as TRL's column does")
    ap.add_argument("--child", choices=COLUMNS, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--kv-blocks", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--no-match-kv", action="store_true",
                    help="let vLLM size the ipcbridge column's KV cache itself (it then takes the memory saved)")
    a = ap.parse_args()
    if a.child:
        Path(a.json).write_text(json.dumps(run_column(a.child, Path(a.model_dir), a)))
        return
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "model")
        write_model(model_dir, a.tiny)
        for column in [a.only] if a.only else COLUMNS:
            out = Path(tmp, f"{column}.json")
            cmd = [sys.executable, *sys.argv, "--child", column, "--model-dir", str(model_dir), "--json", str(out)]
            kv = results.get("trl", {}).get("kv_blocks")
            if column == "ipcbridge" and kv and not a.no_match_kv:
                cmd += ["--kv-blocks", str(kv)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
            if proc.returncode == 0 and out.exists():
                results[column] = json.loads(out.read_text())
            else:
                results[column] = {"error": f"exit code {proc.returncode}"}
            results[column]["wall_seconds"] = time.perf_counter() - t0
            print(f"{column}: done in {results[column]['wall_seconds']:.0f} s", flush=True)
    import torch

    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "settings": vars(a),
              "results": results, "summary": summary(results)}
    Path(a.json).write_text(json.dumps(record, indent=1))
    print(json.dumps(record["summary"], indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
