"""``LocalEngine`` refuses what it can check before starting the engine, in the caller's process and in
milliseconds, as the error's own type; an engine that fails while starting raises its own ipcbridge error type;
and a request's prompts are checked for shape before anything is sent."""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
import time
from pathlib import Path

import pytest
import torch

import ipcbridge
from ipcbridge import EngineError, MappingError, errors
from ipcbridge.engine.client import _start_error
from tests.helpers import tiny_config

#: Well under an engine start (5-7 s on CPU): these checks read at most two small files.
FAST_SECONDS = 1.0


def _children() -> set[int]:
    pids: set[int] = set()
    for f in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        pids |= {int(p) for p in Path(f).read_text().split()}
    return pids


@pytest.fixture
def made_dirs(monkeypatch) -> list[str]:
    """The private directories LocalEngine creates in this test (other processes may start engines meanwhile,
    so a glob of the temp directory would not do)."""
    made: list[str] = []
    real = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    return made


def _model_dir(tmp_path: Path, config: dict | None = None, files: dict[str, str] | None = None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config if config is not None else {"model_type": "llama"}))
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    return tmp_path


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "missing"


def _no_config(tmp_path: Path) -> Path:
    (tmp_path / "model.safetensors").write_text("")
    return tmp_path


def _no_weights(tmp_path: Path) -> Path:
    return _model_dir(tmp_path)


def _bin_weights(tmp_path: Path) -> Path:
    return _model_dir(tmp_path, files={"pytorch_model.bin": ""})


def _missing_shard(tmp_path: Path) -> Path:
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    return _model_dir(tmp_path, files={"model-00001-of-00002.safetensors": "",
                                       "model.safetensors.index.json": json.dumps(index)})


def _dir_without_model_type(tmp_path: Path) -> Path:
    return _model_dir(tmp_path, {"hidden_size": 64}, {"model.safetensors": ""})


def _dir_of_unsupported_arch(tmp_path: Path) -> Path:
    return _model_dir(tmp_path, {"model_type": "bert"}, {"model.safetensors": ""})


def _config(tmp_path: Path):
    return tiny_config("llama")


CASES = [
    # (id, model, kwargs, type, message)
    ("missing-dir", _missing, {}, FileNotFoundError, r"missing is not a local model directory: it does not exist \(no config.json\); pass a directory"),
    ("no-config-json", _no_config, {}, FileNotFoundError, r"not a local model directory \(no config.json\)"),
    ("no-weights", _no_weights, {}, FileNotFoundError, r"no \*.safetensors files in .*: the engine loads weights from safetensors only; save the model"),
    ("bin-weights", _bin_weights, {}, FileNotFoundError, r"pytorch_model.bin.*which the engine does not load"),
    ("missing-shard", _missing_shard, {}, FileNotFoundError, r"lists 1 shard\(s\) that are not there"),
    ("dir-no-model-type", _dir_without_model_type, {}, MappingError, r"config has no 'model_type'"),
    ("dir-unsupported", _dir_of_unsupported_arch, {}, MappingError, r"unknown architecture 'bert'.*maps .*llama"),
    ("dict-no-model-type", lambda p: {"hidden_size": 64}, {}, MappingError, r"config has no 'model_type'"),
    ("dict-unsupported", lambda p: {"model_type": "bert"}, {}, MappingError,
     r"LocalEngine cannot serve this model: unknown architecture 'bert'.*gemma.*llama.*qwen2"),
    ("not-a-config", lambda p: 42, {}, TypeError, r"LocalEngine takes a transformers config"),
    ("device-typo", _config, {"device": "gpu"}, ValueError, r"device='gpu' is not a torch device; use 'cpu'"),
    ("device-mps", _config, {"device": "mps"}, ValueError, r"the embedded engine runs on cpu or cuda"),
    ("dtype-int", _config, {"dtype": "int8"}, ValueError, r"use one of float32, bfloat16, float16, float64"),
    ("dtype-torch-int", _config, {"dtype": torch.int64}, ValueError, r"dtype=torch.int64 is not one"),
    ("dtype-typo", _config, {"dtype": "bf16x"}, ValueError, r"dtype='bf16x'"),
]
if not torch.cuda.is_available():
    CASES.append(("cuda-without-gpu", _config, {"device": "cuda"}, ValueError, r"device='cuda', but .*use device='cpu'"))


@pytest.mark.parametrize(("make", "kwargs", "error", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_arguments_fail_fast_in_the_caller(tmp_path, made_dirs, make, kwargs, error, message) -> None:
    model = make(tmp_path)
    children = _children()
    t0 = time.monotonic()
    with pytest.raises(error, match=message):
        ipcbridge.LocalEngine(model, **kwargs)
    assert time.monotonic() - t0 < FAST_SECONDS
    assert _children() == children  # no engine was started
    assert made_dirs == []


def test_mapping_errors_are_value_errors() -> None:
    """``except ValueError`` catches a bad config as well as a bad device."""
    with pytest.raises(ValueError, match="no 'model_type'"):
        ipcbridge.LocalEngine({"vocab_size": 100})


def test_an_error_raised_while_the_engine_starts_keeps_its_type(made_dirs) -> None:
    """A config only the engine can refuse (its vLLM row sizes need kv heads that divide the heads)."""
    config = tiny_config("llama").to_dict()
    config["num_key_value_heads"] = 3
    children = _children()
    with pytest.raises(MappingError, match=r"(?s)not a multiple of num_key_value_heads 3\n\(raised in the engine"):
        ipcbridge.LocalEngine(config, device="cpu")
    assert len(made_dirs) == 1 and not os.path.exists(made_dirs[0])
    assert _children() <= children


@pytest.mark.parametrize(
    ("log", "error", "message"),
    [
        (["Traceback", "  File x", "ipcbridge.errors.MappingError: bad table", "second line"], MappingError,
         r"^bad table\nsecond line\n\(raised in the engine process"),
        (["Traceback", "ipcbridge.errors.FenceError: held"], ipcbridge.FenceError, "^held"),
        # Only the names errors.error_type knows become types (Note [error types cross processes]).
        (["Traceback", "ipcbridge.errors.SystemExit: no"], EngineError, "^no"),
        (["Traceback", "RuntimeError: boom"], EngineError, r"exited with code 1 while starting:\n.*boom"),
        ([], EngineError, "exited with code 1 while starting"),
    ],
)
def test_start_errors_are_read_from_the_log(log, error, message) -> None:
    e = _start_error(log, 1)
    assert type(e) is error
    assert re.search(message, str(e), flags=re.S)


# ---- prompt shapes (need a running engine for its limits: context 128, vocab 100) -----------------------


@pytest.fixture(scope="module")
def engine():
    with ipcbridge.LocalEngine(tiny_config("llama"), device="cpu", request_timeout=5.0) as eng:
        yield eng


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([1, 2, 3], r"^generate: prompts must be a list of token-id lists, e\.g\. \[\[1, 2, 3\]\]; got a flat list "
                    r"of ints: wrap it in a list$"),
        ([], r"prompts must be a non-empty list of prompts .*got an empty list"),
        ("hello", r"prompts must be a non-empty list of prompts .*got str"),
        ([[]], r"prompts\[0\] must be a non-empty list of token ids in \[0, 100\); got an empty list"),
        ([[1, "a"]], r"prompts\[0\]\[1\] is 'a' \(str\), not an int"),
        ([[1, 2.0]], r"prompts\[0\]\[1\] is 2.0 \(float\), not an int"),
        ([[-1]], r"prompts\[0\]\[0\] = -1 is outside the model's vocabulary \(vocab_size=100\)"),
        ([[5], [100]], r"prompts\[1\]\[0\] = 100 is outside the model's vocabulary"),
        ([torch.tensor([1, 2])], r"prompts\[0\] must be .*got Tensor; convert it with \.tolist\(\)"),
    ],
)
def test_bad_prompts_are_value_errors_in_the_caller(engine, prompts, message) -> None:
    requests = engine.stats()["requests"]
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=message) as info:
        engine.generate(prompts, max_tokens=1)
    assert time.monotonic() - t0 < FAST_SECONDS
    assert isinstance(info.value, EngineError)  # still what `except EngineError` caught before
    assert type(info.value) is ipcbridge.RequestError
    assert errors.error_type("RequestError", EngineError) is ipcbridge.RequestError  # and it crosses the wire
    assert engine.stats()["requests"] == requests  # nothing was sent


def test_score_tokens_are_checked_too(engine) -> None:
    with pytest.raises(ValueError, match=r"score: completion\[0\] = 100 is outside"):
        engine.score([1, 2], [100])
    assert engine.generate([[1, 2, 3]], max_tokens=1)[0].token_ids
