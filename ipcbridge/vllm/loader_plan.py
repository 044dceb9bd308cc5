"""Deriving alias plans from vLLM's own loader, in the worker: where does each HF tensor land?

vLLM already knows where every checkpoint tensor goes: its model's ``load_weights`` copies each HF-named
tensor into a view of a (possibly fused, padded) parameter. :func:`record_loader_plan` drives that very
``load_weights`` with *recording* tensors instead of weights and writes down, per HF tensor, the parameter,
offset, shape and stride it landed at: a :class:`~ipcbridge.mapping.derived.LoaderPlan`, which the trainer
turns into views exactly as it does a table's plan. Any architecture whose loader is a pure view chain is
covered without a table.

Note [recording tensors carry their own element indices]
    A recording tensor is an int64 tensor whose values are its own element indices (``arange``), tagged
    with its HF name. Every operation that only moves values (views, ``chunk``/``unbind``, ``contiguous``,
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

Cost: the recording tensors of all HF tensors are alive until the plan is built (8 bytes per weight on the
CPU); fine for the small models the tests use, about 8x the bf16 model size for a large one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ipcbridge.errors import MappingError
from ipcbridge.mapping.derived import Landing, LoaderPlan
from ipcbridge.vllm.rpc import worker_method

logger = logging.getLogger(__name__)

__all__ = ["LoaderPlanMixin", "hf_parameters", "record_loader_plan"]

#: Operations that only move values (Note [recording tensors carry their own element indices]).
MOVES = frozenset({
    "view", "view_as", "reshape", "reshape_as", "narrow", "select", "__getitem__", "chunk", "split",
    "split_with_sizes", "tensor_split", "unbind", "t", "T.__get__", "mT.__get__", "transpose", "permute",
    "squeeze", "unsqueeze", "flatten", "unflatten", "contiguous", "clone", "detach", "data.__get__", "movedim",
    "expand", "expand_as", "cat", "concat", "stack", "flip", "index_select", "as_strided",
})
#: Questions about a tensor that read no values.
ASKS = frozenset({
    "size", "dim", "numel", "nelement", "stride", "is_contiguous", "element_size", "storage_offset", "__len__",
    "is_floating_point", "__repr__", "__format__", "__hash__", "get_device", "has_names", "untyped_storage",
})
#: Identity while recording: the ids stay on the CPU, the copies they feed are never run.
MOVES_DEVICE = frozenset({"to", "cuda", "cpu", "type", "type_as", "float", "half", "bfloat16"})


class _Ids(torch.Tensor):
    """A recording tensor (Note [recording tensors carry their own element indices])."""

    _ipcbridge_hf: str | None = None


def _ids(name: str, shape: tuple[int, ...]) -> _Ids:
    t = torch.arange(int(torch.Size(shape).numel()), dtype=torch.int64).view(shape).as_subclass(_Ids)
    t._ipcbridge_hf = name
    return t


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


def _offsets(t: torch.Tensor) -> torch.Tensor:
    """The storage offset (in elements) of each element of ``t``, as a CPU int64 tensor of ``t``'s shape."""
    out = torch.full((), t.storage_offset(), dtype=torch.int64)
    for k, (n, s) in enumerate(zip(t.shape, t.stride(), strict=True)):
        out = out + (torch.arange(n, dtype=torch.int64) * s).view([n if i == k else 1 for i in range(t.dim())])
    return out.expand(t.shape)


class _Recorder(TorchFunctionMode):
    """Records ``param_view.copy_(recording)``; refuses value-computing ops on recordings; drops every write
    into parameter memory (Note [the dry run writes no weights])."""

    def __init__(self, params: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr(): (n, p) for n, p in params.items()}
        self.dtype = dtype
        self.pieces: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        self.dropped: list[str] = []

    def _param_of(self, t: Any) -> tuple[str, torch.Tensor] | None:
        if not isinstance(t, torch.Tensor) or isinstance(t, _Ids) or t.device.type == "meta":
            return None
        return self.storages.get(t.untyped_storage().data_ptr())

    def _record(self, dst: torch.Tensor, src: _Ids, op: str) -> None:
        target, param = self._param_of(dst) or ("", dst)
        ids = src.as_subclass(torch.Tensor).expand(dst.shape).reshape(-1)
        offs = (_offsets(dst) - param.storage_offset()).reshape(-1)
        self.pieces.setdefault(src._ipcbridge_hf or "?", []).append((target, offs, ids))

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
                self._record(dst, args[1], op)
            elif op == "__setitem__" and isinstance(args[2], _Ids):
                self._record(dst[args[1]], args[2], op)
            elif srcs:
                raise MappingError(f"{names[0]}: the loader writes it into a parameter with {op!r}, not a copy")
            else:
                self.dropped.append(op)
            return dst
        if not srcs:
            return func(*args, **kwargs)
        if len(names) > 1:
            raise MappingError(f"{names}: the loader combines these HF tensors with {op!r}; not a view of one")
        if op in ASKS or (op.endswith(".__get__") and op not in MOVES):
            return func(*args, **kwargs)
        if op in MOVES_DEVICE:
            return self._device_move(srcs[0], op, args, kwargs)
        if op not in MOVES:
            raise MappingError(
                f"{names[0]}: vLLM's loader applies {op!r} to it, which computes new values: the engine's tensor "
                "is not a view of it, so it cannot be aliased (register a table if the values are in fact equal)"
            )
        out = func(*args, **kwargs)
        for o in _flat(out):
            if isinstance(o, _Ids):
                o._ipcbridge_hf = names[0]
        return out

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


def _landing(name: str, shape: tuple[int, ...], pieces: list[tuple[str, torch.Tensor, torch.Tensor]]) -> Landing:
    """The one strided view the pieces of ``name`` make, or ``MappingError`` saying why there is none."""
    numel = int(torch.Size(shape).numel())
    targets = sorted({t for t, _, _ in pieces})
    if not pieces:
        raise MappingError(f"{name}: vLLM's loader did not copy it into any parameter (it skipped or renamed it)")
    if "" in targets:
        raise MappingError(f"{name}: vLLM's loader copies it into a tensor that is not a model parameter")
    if len(targets) > 1:
        raise MappingError(f"{name}: vLLM's loader splits it over {targets}; one HF tensor must be one view")
    ids = torch.cat([i for _, _, i in pieces])
    offs = torch.cat([o for _, o, _ in pieces])
    count = torch.bincount(ids, minlength=numel)
    if bool((count != 1).any()):
        what = "never lands" if bool((count == 0).any()) else "lands more than once"
        raise MappingError(f"{name}: part of it {what} in {targets[0]}; not a view")
    land = torch.empty(numel, dtype=torch.int64)
    land[ids] = offs
    base = int(land[0]) if numel else 0
    stride, step = [], 1
    for k in reversed(range(len(shape))):
        unit = step  # the flat index of the element one step along dim k
        stride.append(int(land[unit]) - base if shape[k] > 1 else (stride[-1] * shape[k + 1] if stride else 1))
        step *= shape[k]
    stride.reverse()
    expected = base + sum(
        (torch.arange(n, dtype=torch.int64) * s).view([n if i == k else 1 for i in range(len(shape))])
        for k, (n, s) in enumerate(zip(shape, stride, strict=True))
    ) if shape else torch.tensor(base)
    if not torch.equal(torch.as_tensor(expected).expand(shape).reshape(-1), land):
        raise MappingError(f"{name}: its elements land in {targets[0]} in an order no strided view has (a permutation)")
    try:
        return Landing(hf=name, target=targets[0], offset=base, shape=tuple(shape), stride=tuple(stride))
    except ValueError as e:  # negative strides, overlaps: not a trainable view
        raise MappingError(f"{name}: lands in {targets[0]} as no trainable view ({e})") from None


def record_loader_plan(load_weights: Callable[[Iterable[tuple[str, torch.Tensor]]], Any],
                       params: Mapping[str, torch.Tensor], hf_shapes: Mapping[str, tuple[int, ...]],
                       tied: Mapping[str, str], model_type: str, source: str = "vllm load_weights") -> LoaderPlan:
    """Drive ``load_weights`` (vLLM's ``model.load_weights``) with recording tensors named and shaped as
    ``hf_shapes`` and return where each landed in ``params`` (the model's parameters by vLLM name).

    ``tied`` names the HF tensors that share another's (not fed: vLLM skips them too). Raises
    ``MappingError`` naming the first HF tensor that does not land as one strided view, and the reason.
    """
    dtype = next(iter(params.values())).dtype
    recorder = _Recorder(params, dtype)
    with torch.no_grad(), recorder:
        load_weights((name, _ids(name, tuple(shape))) for name, shape in hf_shapes.items())
    if recorder.dropped:
        logger.info("loader plan: dropped %d write(s) into the weights that copied no HF tensor (%s)",
                    len(recorder.dropped), sorted(set(recorder.dropped)))
    landings = tuple(_landing(n, tuple(s), recorder.pieces.get(n, [])) for n, s in hf_shapes.items())
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
