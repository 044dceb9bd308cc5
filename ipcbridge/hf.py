"""The one boundary to ``transformers`` and ``accelerate``: configs in every accepted form, config facts,
and HF models built without weight memory.

Every other module takes configs through here: a ``transformers`` config object, its ``to_dict()`` (a
dict with ``model_type``), or a local model directory. :func:`to_hf_config` turns any of them into a
config object, :func:`config_dict` into a JSON-safe dict (what a manifest or an RPC carries), and the
readers (:func:`config_value`, :func:`model_type`, :func:`positive`, :func:`head_dim`, :func:`kv_heads`)
read one field from a config object or a dict alike, raising ``MappingError`` naming the field. This module
imports nothing of :mod:`ipcbridge.mapping` (the mapper builds on it), and imports ``transformers``,
``accelerate`` and ``safetensors`` only when a function needs them, so ``import ipcbridge`` stays cheap.

Note [building on the meta device]
    An attached model's parameters become views of the engine's memory, so building the model must not
    allocate its weights. :func:`build_meta_model` uses accelerate's ``init_empty_weights(include_buffers=
    False)``. For the duration of the ``with`` block accelerate *monkeypatches*
    ``nn.Module.register_parameter`` (process-wide, so nothing else should build modules in another thread
    meanwhile) to move each parameter to the meta device as it is registered: one parameter's memory at a
    time is ever live, and HF's weight init runs on meta tensors, i.e. costs nothing. Buffers are left
    alone, which is the point: non-persistent buffers such as rotary ``inv_freq`` (and Gemma's embedding
    scale) are *computed* at construction and no engine exports them, so they must be real. Core torch's
    ``with torch.device("meta")`` would put them on meta too (that is ``include_buffers=True``), and a meta
    ``inv_freq`` cannot be recovered without re-running each architecture's own rotary init. The buffers are
    created on the default device; :func:`materialize_buffers` moves them next to the weights.

Note [no weight init on the meta device]
    Construction also runs weight init: torch's ``reset_parameters`` in every ``nn.Linear``/``nn.Embedding``
    and HF's ``post_init`` -> ``init_weights`` over every module. On meta tensors it writes nothing, yet it
    is most of the build: torch's meta ``normal_``/``uniform_`` are Python decompositions, about 0.3 ms a
    call, so the Llama-3-8B shape spent 60 of its 72 ms there (``benchmarks/bench_attach.py``), all of it
    for parameters that ``attach`` replaces by views a moment later. :func:`_skip_weight_init` builds under
    transformers' own ``no_init_weights``, the context ``from_pretrained`` builds under (it swaps torch's
    init functions and ``PreTrainedModel.init_weights`` for no-ops, process-wide, for the ``with`` block,
    as accelerate's patch is). That also skips ``init_weights``' last step, ``tie_weights``, so
    :func:`build_meta_model` ties afterwards, as it would have been: callers count distinct parameters.
    Buffers are unaffected: every architecture computes them at construction (HF's ``_init_weights``
    recomputes the same rotary and embedding-scale values). ``tests/test_hf.py`` checks both, buffers and
    ties, against a fully initialised model for every mapped architecture.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ipcbridge._torch import module_buffers
from ipcbridge.errors import BridgeError, MappingError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

_MISSING = object()


# ---- reading config fields (config objects and dicts alike) ---------------------------------------------


def config_value(config: Any, key: str, default: Any = _MISSING) -> Any:
    """Read ``key`` from an HF config object or dict; a missing field without ``default`` is a MappingError."""
    value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
    if value is _MISSING:
        raise MappingError(f"config has no field {key!r}, which this architecture needs")
    return value


def model_type(config: Any) -> str:
    mt = config_value(config, "model_type", None)
    if not isinstance(mt, str) or not mt:
        raise MappingError(
            "config has no 'model_type'; pass a transformers config, or its to_dict() (which carries "
            "model_type, e.g. 'llama')"
        )
    return mt


def positive(config: Any, key: str) -> int:
    v = config_value(config, key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise MappingError(f"config.{key} must be a positive integer, got {v!r}")
    return v


def head_dim(config: Any) -> int:
    heads = positive(config, "num_attention_heads")
    hd = config_value(config, "head_dim", None)
    if hd is None:
        hidden = positive(config, "hidden_size")
        if hidden % heads:
            raise MappingError(
                f"config: hidden_size {hidden} is not divisible by num_attention_heads {heads}; set head_dim "
                "or fix the head count"
            )
        hd = hidden // heads
    return int(hd)


def kv_heads(config: Any) -> int:
    heads = positive(config, "num_attention_heads")
    kv = config_value(config, "num_key_value_heads", None) or heads
    if not isinstance(kv, int) or kv <= 0 or heads % kv:
        raise MappingError(
            f"config: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv!r}"
        )
    return kv


# ---- normalising whole configs -------------------------------------------------------------------------


def to_hf_config(config: Any) -> PretrainedConfig:
    """A ``transformers`` config from a config object, a dict with ``model_type`` (``to_dict()`` output)
    or a local model directory."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, Mapping):
        mt = model_type(config)
        fields = {k: v for k, v in config.items() if k != "model_type"}
        try:
            return AutoConfig.for_model(mt, **fields)
        except Exception as e:  # transformers validates configs with several exception types
            raise MappingError(f"transformers rejects this {mt!r} config: {e}") from None
    if isinstance(config, (str, os.PathLike)):
        return AutoConfig.from_pretrained(config)
    raise TypeError(
        f"config must be a transformers config, a dict with 'model_type' or a local model directory, got "
        f"{type(config).__name__}"
    )


def _json_safe(d: Mapping[str, Any]) -> dict[str, Any]:
    # str() for values JSON has no type for (dtypes, attributes an engine added to the config).
    try:
        return json.loads(json.dumps(dict(d), default=str))
    except (TypeError, ValueError) as e:  # keys JSON cannot carry
        raise TypeError(f"the config cannot be written as JSON: {e}") from None


def config_dict(config: Any) -> dict[str, Any] | None:
    """A JSON-safe dict of ``config`` (a config object, a dict or a local model directory); None for None.

    Config objects go through ``to_json_string(use_diff=False)``, which writes every field as
    transformers serialises it (dtypes as strings, label ids as string keys); where an attribute someone
    added (vLLM does) is no JSON, through ``to_dict()`` with ``str()`` for such values.
    """
    if config is None:
        return None
    if isinstance(config, (str, os.PathLike)):
        config = to_hf_config(config)
    if isinstance(config, Mapping):
        return _json_safe(config)
    if hasattr(config, "to_json_string"):
        try:
            return json.loads(config.to_json_string(use_diff=False))
        except (TypeError, ValueError):
            pass  # an attribute is not JSON: fall back to str() for those values
    if hasattr(config, "to_dict"):
        return _json_safe(config.to_dict())
    raise TypeError(
        f"config must be a transformers config, a dict or a local model directory, got {type(config).__name__}"
    )


def architecture_for(model_type: str) -> str:
    """The ``*ForCausalLM`` class name transformers maps ``model_type`` to (``config.architectures``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(model_type))].__name__
    except (KeyError, ValueError):
        raise BridgeError(f"transformers has no causal LM for model_type {model_type!r}") from None


def write_model_dir(config: Any, path: str) -> str:
    """Write ``config`` (a transformers config, or its dict) as ``path/config.json``; return ``path``.

    Engines that load from a directory (vLLM) pick the model class from ``architectures``, which configs
    built in code usually lack: it is filled in from the model type (without changing the caller's config).
    """
    if hasattr(config, "save_pretrained"):
        if not getattr(config, "architectures", None):
            config = copy.copy(config)
            config.architectures = [architecture_for(model_type(config))]
        config.save_pretrained(path)
        return path
    if isinstance(config, Mapping):
        try:
            mt = model_type(config)
        except MappingError as e:  # the engine, not the mapper, needs it here
            raise BridgeError(f"cannot write a model directory: {e}") from None
        d = _json_safe(config)
        d.setdefault("architectures", [architecture_for(mt)])
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(d, f)
        return path
    raise TypeError(f"config must be a transformers config or a dict, got {type(config).__name__}")


# ---- models ---------------------------------------------------------------------------------------------


def build_meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The HF causal LM for ``config`` with every parameter on the meta device and every buffer real.

    See Note [building on the meta device].
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = to_hf_config(config)
    with init_empty_weights(include_buffers=False), _skip_weight_init():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    model.tie_weights()  # what the skipped init_weights ends with: Note [no weight init on the meta device]
    return model


def _skip_weight_init() -> AbstractContextManager[None]:
    """transformers' ``no_init_weights``: Note [no weight init on the meta device]. It moved from
    ``modeling_utils`` (4.x) to ``initialization`` (5.x); both skip torch's init functions and HF's."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def materialize_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Move ``model``'s buffers (real, on the default device: Note [building on the meta device]) to
    ``device``, in place.

    Only buffers are touched: ``model.to(device)`` would also visit the parameters, which are views of an
    engine's memory and must never be re-assigned.
    """
    device = torch.device(device)
    for module in model.modules():
        buffers = module_buffers(module)
        for name, buf in list(buffers.items()):
            if buf is not None and buf.device != device:
                buffers[name] = buf.to(device)


def load_hf_state_dict(source: Mapping[str, Any]) -> tuple[PretrainedConfig, dict[str, torch.Tensor]]:
    """(HF config, HF state dict) from ``{"config": {...}, "seed": n}`` (random weights from ``seed``) or
    ``{"path": local_dir}`` (its ``config.json`` and ``*.safetensors``)."""
    from transformers import AutoModelForCausalLM

    if "path" in source:
        return _load_model_dir(Path(source["path"]))
    config = to_hf_config(source["config"])
    torch.manual_seed(int(source.get("seed", 0)))
    model = AutoModelForCausalLM.from_config(config)
    return config, {n: p.detach() for n, p in model.named_parameters()}


#: A sharded checkpoint's index (``save_pretrained`` writes it next to the shards).
SAFETENSORS_INDEX = "model.safetensors.index.json"
_DIR_HELP = "pass a directory written by save_pretrained (config.json and *.safetensors), or a transformers config"


def weight_files(path: Path) -> list[Path]:
    """The safetensors files a model directory's weights are read from (what :func:`load_hf_state_dict` loads);
    ``FileNotFoundError`` naming what is missing: no ``*.safetensors`` at all, or shards its index lists."""
    files = sorted(path.glob("*.safetensors"))
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MappingError(f"{index} is not a safetensors index (no weight_map: {e}); re-save the model") from None
        missing = sorted(shards - {f.name for f in files})
        if missing:
            raise FileNotFoundError(
                f"{path}: {SAFETENSORS_INDEX} lists {len(missing)} shard(s) that are not there: {missing[:4]}; "
                "copy the whole checkpoint directory"
            )
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin"))
        found = f" (it has {bins[:3]}: PyTorch pickles, which the engine does not load)" if bins else ""
        raise FileNotFoundError(
            f"no *.safetensors files in {path}{found}: the engine loads weights from safetensors only; save the "
            "model with model.save_pretrained(path) (safetensors is its default), or pass a config for random weights"
        )
    return files


def model_dir_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A local model directory's ``config.json`` as a dict, after checking the directory has weights.

    Cheap (reads two small files, imports no ``transformers``), so ``LocalEngine`` runs it in the caller's
    process before starting an engine: ``FileNotFoundError`` naming the path and what it lacks, or
    ``MappingError`` for a config.json that is no config (no ``model_type``).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a local model directory: it does not exist (no config.json); {_DIR_HELP}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a local model directory (no config.json); {_DIR_HELP}")
    weight_files(path)
    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise MappingError(f"{config_file} is not valid JSON ({e}); re-save the config") from None
    if not isinstance(config, dict):
        raise MappingError(f"{config_file} holds a {type(config).__name__}, not a config object; re-save the config")
    model_type(config)
    return config


def _load_model_dir(path: Path) -> tuple[PretrainedConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    model_dir_config(path)  # the same checks the caller ran before starting the engine (the dir may have changed)
    config = to_hf_config(path)
    files = weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if getattr(config, "tie_word_embeddings", False):
        # A tied checkpoint may still hold lm_head: the model shares the embedding, never loads it.
        state.pop("lm_head.weight", None)
    return config, state
