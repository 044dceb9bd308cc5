"""Deriving alias plans from vLLM's own loader, in the worker: where does each HF tensor land?

vLLM already knows where every checkpoint tensor goes: its model's ``load_weights`` copies each HF-named
tensor into a view of a (possibly fused, padded) parameter. :func:`record_loader_plan` drives that very
``load_weights`` with *recording* tensors instead of weights and writes down, per HF tensor, the parameter,
offset, shape and stride it landed at: a :class:`~ipcbridge.mapping.derived.LoaderPlan`, which the trainer
turns into views exactly as it does a table's plan. Any architecture whose loader is a pure view chain is
covered without a table.

Note [recording tensors carry their own element indices]
    A recording tensor is an int64 tensor whose values are its own element indices (an ``arange``, held
    symbolically: Note [recording tensors are symbolic until a loader copies them]), tagged with its HF name. Every operation that only moves values (views, ``chunk``/``unbind``, ``contiguous``,
    ``to(device)``) keeps each value attached to its source element, whatever torch does in memory, so when
    the loader finally calls ``param_view.copy_(loaded)`` the values say exactly which HF element goes to
    which parameter element. Operations that compute values (arithmetic, a dtype change other than to the
    model's own dtype, ``item()``) are refused, naming the tensor and the operation: a landing that is not
    a pure copy can never be an alias. Finally each HF tensor's landings must cover it once, in one
    parameter, at ``offset + sum(i_k * stride_k)``: a strided view. A permutation or a split into two
    places is refused, naming the tensor.

Note [the dry run writes no weights]
    The recorder is a ``TorchFunctionMode``: it sees every torch call the loader makes, including writes
    into the parameters that do not involve a recording tensor (vocab padding's ``fill_(0)``). Writes into
    parameter memory are never executed: the ones from recording tensors are recorded, the others logged
    and dropped. Replacing a parameter's ``.data`` is refused. So the served weights are untouched.

Note [recording tensors are symbolic until a loader copies them]
    Written out, an index tensor costs 8 bytes per weight. So a recording tensor starts as a *meta* tensor
    (no memory) viewed from a flat root: a view's values are then implied by its storage offset and strides.
    View ops run on the meta tensors, and each ``copy_`` is reduced at once to an
    :class:`~ipcbridge.mapping.pieces.AffinePiece` (a few integers). Only when a loader applies a copying op
    (``contiguous`` of a transpose, ``cat``, ``flip``) are that op's inputs written out as index tensors, for
    that op alone (:class:`~ipcbridge.mapping.pieces.ExplicitPiece`). A dry run over a pure-view loader
    therefore holds no per-weight memory however large the model (measured in docs/mapping.md).

Note [checkpoint names, not HF parameter names]
    vLLM's loaders are written for checkpoints. Where transformers 5 fuses checkpoint tensors into one
    parameter (MoE experts), each HF tensor is fed as the checkpoint tensors it is made of, each a view of
    its recording tensor (:func:`ipcbridge.mapping.checkpoint.checkpoint_views`), so the per-expert copies
    compose into the fused parameter's one landing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ipcbridge.errors import MappingError
from ipcbridge.mapping.checkpoint import Rule, checkpoint_rules, checkpoint_views
from ipcbridge.mapping.derived import LoaderPlan
from ipcbridge.mapping.pieces import AffinePiece, ExplicitPiece, Piece, affine_values, landing
from ipcbridge.vllm.rpc import worker_method

logger = logging.getLogger(__name__)

__all__ = ["LoaderPlanMixin", "hf_parameters", "record_loader_plan"]

#: Operations that only move values (Note [recording tensors carry their own element indices]).
MOVES = frozenset({
    "view", "view_as", "reshape", "reshape_as", "narrow", "select", "__getitem__", "chunk", "split",
    "split_with_sizes", "tensor_split", "unbind", "t", "T.__get__", "mT.__get__", "transpose", "permute",
    "squeeze", "unsqueeze", "flatten", "unflatten", "contiguous", "clone", "movedim",
    "expand", "expand_as", "cat", "concat", "stack", "flip", "index_select", "as_strided",
})
#: The very tensor again (no new values, no new layout): kept symbolic as it is.
SAME = frozenset({"detach", "data.__get__"})
#: Questions about a tensor that read no values.
ASKS = frozenset({
    "size", "dim", "numel", "nelement", "stride", "is_contiguous", "element_size", "storage_offset", "__len__",
    "is_floating_point", "__repr__", "__format__", "__hash__", "get_device", "has_names", "untyped_storage",
})
#: Identity while recording: the ids stay on the CPU, the copies they feed are never run.
MOVES_DEVICE = frozenset({"to", "cuda", "cpu", "type", "type_as", "float", "half", "bfloat16"})


class _Ids(torch.Tensor):
    """A recording tensor (Note [recording tensors carry their own element indices]): symbolic (meta, a view
    of ``_ipcbridge_root``) or explicit (CPU int64 values)."""

    _ipcbridge_hf: str | None = None
    _ipcbridge_root: torch.Tensor | None = None


def _tag(t: Any, name: str, root: torch.Tensor | None) -> None:
    if isinstance(t, _Ids):
        t._ipcbridge_hf = name
        t._ipcbridge_root = root


def _ids(name: str, shape: tuple[int, ...]) -> _Ids:
    """A symbolic recording tensor (Note [recording tensors are symbolic until a loader copies them])."""
    root = torch.empty(int(torch.Size(shape).numel()), dtype=torch.int64, device="meta")
    t = root.view(shape).as_subclass(_Ids)
    _tag(t, name, root)
    return t


def _symbolic(t: _Ids) -> bool:
    return t._ipcbridge_root is not None


def _explicit(t: _Ids) -> _Ids:
    """``t``'s values written out: its flat indices into the HF tensor, implied by its view of the root."""
    if not _symbolic(t):
        return t
    out = _offsets(t).view(t.shape).as_subclass(_Ids)
    _tag(out, t._ipcbridge_hf or "?", None)
    return out


def _storage_key(t: torch.Tensor) -> int:
    """Which storage ``t`` views. Note [storage identity on meta tensors]: ``data_ptr`` is 0 for every meta
    tensor, so the storage is told apart by its ``StorageImpl`` (``_cdata``, private), which views share;
    it lets the recorder run over meta parameters (the memory measurement) as over CUDA ones."""
    storage = t.untyped_storage()
    return int(getattr(storage, "_cdata", 0) or storage.data_ptr())


def _op_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", repr(func))
    if name in ("__get__", "__set__"):  # a property: Tensor.shape.__get__ -> "shape.__get__"
        owner = getattr(func, "__self__", None)
        return f"{getattr(owner, '__name__', '?')}.{name}"
    return name


def _flat(obj: Any) -> Iterator[Any]:
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flat(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flat(o)
    else:
        yield obj


def _swap(obj: Any, fn: Callable[[_Ids], _Ids]) -> Any:
    """``obj`` (args/kwargs) with every recording tensor replaced by ``fn(it)``."""
    if isinstance(obj, _Ids):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_swap(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _swap(v, fn) for k, v in obj.items()}
    return obj


def _offsets(t: torch.Tensor) -> torch.Tensor:
    """The storage offset (in elements) of each element of ``t``, flat, as a CPU int64 tensor."""
    return affine_values(t.storage_offset(), t.stride(), tuple(t.shape))


class _Recorder(TorchFunctionMode):
    """Records ``param_view.copy_(recording)`` as pieces; refuses value-computing ops on recordings; drops
    every write into parameter memory (Note [the dry run writes no weights])."""

    def __init__(self, params: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        self.storages = {_storage_key(p): (n, p) for n, p in params.items()}
        self.dtype = dtype
        self.pieces: dict[str, list[Piece]] = {}
        self.dropped: list[str] = []

    def _param_of(self, t: Any) -> tuple[str, torch.Tensor] | None:
        if not isinstance(t, torch.Tensor) or isinstance(t, _Ids):
            return None
        return self.storages.get(_storage_key(t))

    def _record(self, dst: torch.Tensor, src: _Ids) -> None:
        """Reduce one copy to a piece at once (Note [recording tensors are symbolic until a loader copies
        them]): nothing per element is kept for a symbolic source."""
        target, param = self._param_of(dst) or ("", dst)
        src_view = src.expand(dst.shape)
        at = dst.storage_offset() - param.storage_offset()
        piece: Piece
        if _symbolic(src):
            piece = AffinePiece(target, tuple(dst.shape), src_view.storage_offset(), tuple(src_view.stride()), at,
                                tuple(dst.stride()))
        else:
            piece = ExplicitPiece(target, src_view.as_subclass(torch.Tensor).reshape(-1).clone(),
                                  _offsets(dst) - param.storage_offset())
        self.pieces.setdefault(src._ipcbridge_hf or "?", []).append(piece)

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        op = _op_name(func)
        srcs = [a for a in _flat((args, kwargs)) if isinstance(a, _Ids)]
        names = sorted({s._ipcbridge_hf or "?" for s in srcs})
        dst = args[0] if args else None
        if op == "data.__set__" and (srcs or self._param_of(dst)):
            raise MappingError(f"{names or [op]}: the loader replaces a parameter's .data; not a view landing")
        in_place = op.endswith("_") and not op.startswith("__") and "." not in op  # not a property's __get__
        writes = op == "__setitem__" or in_place or "out" in kwargs
        if writes and self._param_of(kwargs.get("out", dst)) is not None:
            if op == "copy_" and isinstance(args[1], _Ids):
                self._record(dst, args[1])
            elif op == "__setitem__" and isinstance(args[2], _Ids):
                self._record(dst[args[1]], args[2])
            elif srcs:
                raise MappingError(f"{names[0]}: the loader writes it into a parameter with {op!r}, not a copy")
            else:
                self.dropped.append(op)
            return dst
        if not srcs:
            return func(*args, **kwargs)
        if len(names) > 1:
            raise MappingError(f"{names}: the loader combines these HF tensors with {op!r}; not a view of one")
        if op in ASKS or (op.endswith(".__get__") and op not in MOVES and op not in SAME):
            return func(*args, **kwargs)
        if op in SAME:
            return args[0]
        if op in MOVES_DEVICE:
            return self._device_move(srcs[0], op, args, kwargs)
        if op not in MOVES:
            raise MappingError(
                f"{names[0]}: vLLM's loader applies {op!r} to it, which computes new values: the engine's tensor "
                "is not a view of it, so it cannot be aliased (register a table if the values are in fact equal)"
            )
        return self._move(func, names[0], srcs, args, kwargs)

    def _move(self, func: Callable[..., Any], name: str, srcs: list[_Ids], args: tuple, kwargs: Any) -> Any:
        """A value-moving op: on the meta views while it is a view of the root, else on written-out values."""
        roots = {id(s._ipcbridge_root) for s in srcs if _symbolic(s)}
        root = next((s._ipcbridge_root for s in srcs if _symbolic(s)), None)
        outs: Any = None
        if len(roots) == 1 and all(_symbolic(s) for s in srcs):
            outs = func(*args, **kwargs)
            if all(o._base is root for o in _flat(outs) if isinstance(o, torch.Tensor)):
                for o in _flat(outs):
                    _tag(o, name, root)
                return outs
        outs = func(*_swap(args, _explicit), **_swap(kwargs, _explicit))  # a copying op: real values
        for o in _flat(outs):
            _tag(o, name, None)
        return outs

    def _device_move(self, src: _Ids, op: str, args: tuple, kwargs: Mapping[str, Any]) -> _Ids:
        dtypes = [a for a in _flat((args[1:], kwargs)) if isinstance(a, torch.dtype)]
        if op in ("float", "half", "bfloat16"):
            dtypes.append({"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}[op])
        bad = [d for d in dtypes if d not in (self.dtype, torch.int64)]
        if bad or (op == "type_as" and isinstance(args[1], torch.Tensor) and args[1].dtype != self.dtype):
            raise MappingError(
                f"{src._ipcbridge_hf}: vLLM's loader converts it to {bad or op} while the model is {self.dtype}; "
                "a converted tensor is a copy, not a view. Serve the model in the checkpoint's dtype"
            )
        return src


def _feed(hf_shapes: Mapping[str, tuple[int, ...]], rules: tuple[Rule, ...]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint name, recording tensor)`` pairs, each HF tensor's made only when the loader asks for it
    (Note [checkpoint names, not HF parameter names])."""
    for name, shape in hf_shapes.items():
        yield from checkpoint_views(name, _ids(name, tuple(shape)), rules)


def record_loader_plan(load_weights: Callable[[Iterable[tuple[str, torch.Tensor]]], Any],
                       params: Mapping[str, torch.Tensor], hf_shapes: Mapping[str, tuple[int, ...]],
                       tied: Mapping[str, str], model_type: str, source: str = "vllm load_weights",
                       rules: tuple[Rule, ...] | None = None) -> LoaderPlan:
    """Drive ``load_weights`` (vLLM's ``model.load_weights``) with recording tensors named and shaped as
    ``hf_shapes`` and return where each landed in ``params`` (the model's parameters by vLLM name).

    ``tied`` names the HF tensors that share another's (not fed: vLLM skips them too). ``rules``: how HF
    tensors are made of checkpoint tensors (default: transformers' mapping for ``model_type``). Raises
    ``MappingError`` naming the first HF tensor that does not land as one strided view, and the reason.
    """
    dtype = next(iter(params.values())).dtype
    recorder = _Recorder(params, dtype)
    rules = checkpoint_rules(model_type) if rules is None else rules
    with torch.no_grad(), recorder:
        load_weights(_feed(hf_shapes, rules))
    if recorder.dropped:
        logger.info("loader plan: dropped %d write(s) into the weights that copied no HF tensor (%s)",
                    len(recorder.dropped), sorted(set(recorder.dropped)))
    landings = tuple(landing(n, tuple(s), recorder.pieces.get(n, [])) for n, s in hf_shapes.items())
    return LoaderPlan(model_type=model_type, landings=landings, tied=dict(tied), source=source)


def hf_parameters(hf_config: Any, dtype: torch.dtype) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The HF model's distinct parameters (name -> shape) and its tied names (name -> the name it shares),
    from the model built on the meta device."""
    from ipcbridge.hf import build_meta_model

    model = build_meta_model(hf_config, dtype)
    # Built on meta, transformers does not tie yet; tie_weights() ties exactly what the config asks for.
    model.tie_weights()
    first: dict[int, str] = {}
    shapes, tied = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
            shapes[name] = tuple(p.shape)
    return shapes, tied


class LoaderPlanMixin:
    """Worker methods deriving a :class:`LoaderPlan` from the served model's own ``load_weights``.

    Mixed into :class:`ipcbridge.vllm.WorkerExtension`, whose ``_ipcbridge_model`` it uses. The plan holds
    names and numbers only; it stays true while vLLM keeps the parameters it recorded (the life of the
    engine: Note [the engine owns the weight version] in :mod:`ipcbridge.vllm.extension`).
    """

    def _ipcbridge_loader_plan(self) -> LoaderPlan:
        from ipcbridge.hf import model_type

        model = self._ipcbridge_model()  # type: ignore[attr-defined]
        hf_config = self.vllm_config.model_config.hf_config  # type: ignore[attr-defined]
        params = dict(model.named_parameters())
        dtype = next(iter(params.values())).dtype
        shapes, tied = hf_parameters(hf_config, dtype)
        try:
            import vllm

            source = f"vllm {vllm.__version__} {type(model).__name__}.load_weights"
        except ImportError:  # a fake worker in tests
            source = f"{type(model).__name__}.load_weights"
        return record_loader_plan(model.load_weights, params, shapes, tied, model_type(hf_config), source)

    @worker_method
    def ipcbridge_loader_plan(self) -> dict[str, Any]:
        """The served model's alias plan, derived from its ``load_weights`` (``LoaderPlan.to_dict()``)."""
        return self._ipcbridge_loader_plan().to_dict()
