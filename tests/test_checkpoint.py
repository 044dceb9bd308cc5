"""HF checkpoint export of an attached model: ipcbridge.save_pretrained, and a transformers Trainer run."""

from __future__ import annotations

import json
import os
import weakref

import pytest
import torch

import ipcbridge
from ipcbridge import checkpoint, mapping
from tests.helpers import reference_model as helpers_reference_model
from tests.helpers import tiny_config, vllm_weights
from tests.mapping.mapping_cases import CASES, reference_model, token_ids

SAVED_CASES = ["llama-untied", "qwen3-qknorm", "gemma2-tied", "phi3-tied", "gpt2-untied", "opt-tied"]


def _attached(case_id: str):
    cfg = next(c for c in CASES if c.id == case_id).config()
    ref = reference_model(cfg)
    engine = {k: t.clone() for k, t in mapping.to_vllm(dict(ref.state_dict()), cfg).items()}
    return cfg, ref, engine, ipcbridge.attach(engine, cfg)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _in_engine(model, engine) -> bool:
    storages = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in engine.values()]
    return all(any(lo <= p.data_ptr() < lo + n for lo, n in storages) for p in model.parameters())


@pytest.mark.parametrize("case_id", SAVED_CASES)
def test_save_pretrained_round_trips_through_from_pretrained(tmp_path, case_id: str) -> None:
    from safetensors import safe_open

    cfg, ref, engine, model = _attached(case_id)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    files = ipcbridge.save_pretrained(model, tmp_path)
    assert files == [str(tmp_path / "model.safetensors")]
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    assert "model.safetensors.index.json" not in os.listdir(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    expected = {n for n, _ in ref.named_parameters()}  # distinct parameters: a tied lm_head is left out
    assert keys == expected
    assert ("lm_head.weight" in keys) == (not cfg.tie_word_embeddings)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [type(ref).__name__]

    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(_load(tmp_path)(ids).logits, ref(ids).logits)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs and _in_engine(model, engine)


def test_sharded_save_holds_one_shard_of_copies(tmp_path, monkeypatch) -> None:
    import safetensors.torch

    _, ref, _, model = _attached("llama-untied")
    live: list[weakref.ref] = []
    real_copy, real_save = checkpoint._host_copy, safetensors.torch.save_file
    alive_at_save: list[tuple[int, int]] = []

    def tracking_copy(t):
        out = real_copy(t)
        live.append(weakref.ref(out))
        return out

    def tracking_save(tensors, filename, metadata=None):
        alive_at_save.append((sum(r() is not None for r in live), len(tensors)))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "_host_copy", tracking_copy)
    monkeypatch.setattr(safetensors.torch, "save_file", tracking_save)
    files = ipcbridge.save_pretrained(model, tmp_path, max_shard_size="20KB")

    n = len(files)
    assert n > 2
    assert [os.path.basename(f) for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert all(alive == shard for alive, shard in alive_at_save), alive_at_save  # earlier shards were dropped
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {name for name, _ in ref.named_parameters()}
    assert set(index["weight_map"].values()) == {os.path.basename(f) for f in files}
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in ref.parameters())
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(_load(tmp_path)(ids).logits, ref(ids).logits)

    # A later single-file save into the same folder removes the stale shards and index.
    ipcbridge.save_pretrained(model, tmp_path)
    assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == ["model.safetensors"]


@pytest.mark.parametrize("case_id", ["llama-untied", "gemma2-tied", "gpt2-untied"])
def test_shards_and_index_match_transformers_own_save(tmp_path, case_id: str) -> None:
    """The attached model's tensors share the engine's storages; the plan must still be transformers' plan."""
    _, ref, _, model = _attached(case_id)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    files = ipcbridge.save_pretrained(model, tmp_path / "ours", max_shard_size="20KB")

    def weight_files(d):
        return sorted(f for f in os.listdir(d) if "safetensors" in f)

    assert len(files) > 2
    assert weight_files(tmp_path / "ours") == weight_files(tmp_path / "hf")
    ours = json.loads((tmp_path / "ours" / checkpoint.INDEX_NAME).read_text())
    theirs = json.loads((tmp_path / "hf" / checkpoint.INDEX_NAME).read_text())
    assert ours == theirs  # same weight_map (names and files) and metadata (total_size, total_parameters)
    assert list(ours["weight_map"]) == sorted(ours["weight_map"])  # written with sorted keys, as transformers
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(_load(tmp_path / "ours")(ids).logits, _load(tmp_path / "hf")(ids).logits)
        assert torch.equal(_load(tmp_path / "ours")(ids).logits, ref(ids).logits)


def test_shards_of_weights_in_one_shared_segment(tmp_path) -> None:
    """An engine may hold every weight in one allocation (a /dev/shm segment, a vLLM memory pool): the plan
    must size each tensor by its own bytes, not by the storage they all share (that would be one shard)."""
    cfg = tiny_config("llama")
    ref = helpers_reference_model(cfg)
    weights = vllm_weights(ref, cfg)
    pool = torch.empty(sum(t.numel() for t in weights.values()))
    views, at = {}, 0
    for name, t in weights.items():
        views[name] = pool[at:at + t.numel()].view(t.shape).copy_(t)
        at += t.numel()
    model = ipcbridge.attach(views, cfg)
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1
    ref.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    ipcbridge.save_pretrained(model, tmp_path / "ours", max_shard_size="40KB")
    ours = json.loads((tmp_path / "ours" / checkpoint.INDEX_NAME).read_text())
    assert ours == json.loads((tmp_path / "hf" / checkpoint.INDEX_NAME).read_text())
    assert len(set(ours["weight_map"].values())) > 2
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(_load(tmp_path / "ours")(ids).logits, ref(ids).logits)


def test_shard_size_is_validated(tmp_path) -> None:
    _, _, _, model = _attached("gpt2-tied")
    for bad in ("lots", 0, "-1GB"):
        with pytest.raises(ValueError, match="max_shard_size"):
            ipcbridge.save_pretrained(model, tmp_path, max_shard_size=bad)
    assert checkpoint.parse_size("1.5KB") == 1500 and checkpoint.parse_size("2MiB") == 2 * 2**20


def _tokenizer_dir(path) -> str:
    """A model directory as a user has one: a real (tiny, built here) tokenizer, a generation config with
    sampling defaults, and a config.json that must not reach the checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "hello", "world", "again"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)
    GenerationConfig(temperature=0.6, top_p=0.9, do_sample=True, eos_token_id=[2, 5]).save_pretrained(path)
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "config.json").write_text('{"model_type": "not-this-one"}')
    return str(path)


def test_tokenizer_and_generation_files_are_copied(tmp_path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    src = _tokenizer_dir(tmp_path / "src")
    present = sorted(f for f in checkpoint.SOURCE_FILES if os.path.exists(os.path.join(src, f)))
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "merges.txt"} <= set(present)
    assert "vocab.json" not in present and "tokenizer.model" not in present  # absent files are skipped

    _, ref, _, model = _attached("llama-untied")
    ipcbridge.save_pretrained(model, tmp_path / "out", source_dir=tmp_path / "src")
    out = tmp_path / "out"
    for name in present:
        assert (out / name).read_bytes() == (tmp_path / "src" / name).read_bytes(), name
    assert not (out / "vocab.json").exists() and not (out / "tokenizer.model").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"  # the model's, not the source's
    assert GenerationConfig.from_pretrained(out).temperature == 0.6  # the source's sampling defaults
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hello world again")["input_ids"] == [4, 5, 6] and tok.eos_token == "</s>"
    with torch.no_grad():
        assert torch.equal(_load(out)(token_ids()).logits, ref(token_ids()).logits)


def test_source_dir_defaults_to_where_the_config_came_from(tmp_path) -> None:
    src = _tokenizer_dir(tmp_path / "src")
    _, _, _, model = _attached("qwen3-qknorm")
    model.config._name_or_path = src  # as AutoConfig.from_pretrained(dir), and so LocalEngine(dir), sets it
    ipcbridge.save_pretrained(model, tmp_path / "auto")
    assert (tmp_path / "auto" / "tokenizer.json").exists()
    ipcbridge.save_pretrained(model, tmp_path / "none", source_dir=False)
    assert not (tmp_path / "none" / "tokenizer.json").exists()

    model.config._name_or_path = "Qwen/Qwen3-0.6B"  # a hub id, not a local directory: nothing to copy
    ipcbridge.save_pretrained(model, tmp_path / "hub")
    assert sorted(os.listdir(tmp_path / "hub")) == ["config.json", "generation_config.json", "model.safetensors"]

    # Saving into the source directory itself copies nothing onto itself and keeps its tokenizer.
    before = (tmp_path / "src" / "tokenizer.json").read_bytes()
    ipcbridge.save_pretrained(model, src, source_dir=src)
    assert (tmp_path / "src" / "tokenizer.json").read_bytes() == before


def test_a_missing_source_dir_fails_before_writing(tmp_path) -> None:
    _, _, _, model = _attached("gpt2-tied")
    with pytest.raises(FileNotFoundError, match="source_dir=False"):
        ipcbridge.save_pretrained(model, tmp_path / "out", source_dir=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.ids = token_ids(n=8, seed=5).repeat(n, 1)[:n]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_checkpoints_of_an_attached_model(tmp_path) -> None:
    """transformers' own saving copes with the fused views (it clones storage-sharing tensors itself)."""
    from transformers import Trainer, TrainingArguments

    _, _, engine, model = _attached("llama-untied")
    before = {k: t.clone() for k, t in engine.items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=1, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1,
                             dataloader_num_workers=0, disable_tqdm=True)
    model.train()
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(4))
    trainer.train()
    model.eval()

    assert _in_engine(model, engine), "the Trainer must train the engine's tensors in place"
    assert any(not torch.equal(engine[k], before[k]) for k in engine)
    assert {"checkpoint-1", "checkpoint-2"} <= set(os.listdir(tmp_path))
    ids = token_ids()
    with torch.no_grad():
        now = model(ids).logits
        assert torch.equal(_load(tmp_path / "checkpoint-2")(ids).logits, now)
        trainer.save_model(str(tmp_path / "final"))
        assert torch.equal(_load(tmp_path / "final")(ids).logits, now)
        ipcbridge.save_pretrained(trainer.model, tmp_path / "ours")
        assert torch.equal(_load(tmp_path / "ours")(ids).logits, now)
    assert _in_engine(model, engine)
