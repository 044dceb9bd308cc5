"""``master_weights``: fp32-exact training of bf16/fp16 weights that an engine serves, in place.

Note [master weights without a second copy]
    An optimizer stepping a bf16 weight directly loses every update smaller than half a bf16 ulp
    (2**-9 relative): at lr 1e-6 nearly all of them. Classic mixed precision keeps an fp32 master per
    weight, steps that, and copies it back rounded to nearest; that is a second copy (+4 bytes/param).
    :class:`MasterWeights` gives the same numbers with less:

    ``"remainder"``  the served bf16 weight is the master's rounded high half; the trainer keeps a signed
                     16-bit remainder per element and the master is rebuilt exactly (Note [the remainder
                     identity] in :mod:`ipcbridge.optim.codec`): +2 bytes/param.
    ``"fp32"``       a full fp32 master per weight: +4 bytes/param.
    ``"stochastic"`` the served weight is the stepped value rounded up or down at random, unbiased: +0.
    fp32 weights (any mode) are stepped directly, as the wrapped optimizer would.

    The wrapped optimizer never sees the model's parameters during a step. It sees one fp32 *shell* per
    parameter: the persistent master (``"fp32"``), or a tensor that holds the rebuilt master only while
    its chunk is stepped (``"remainder"``, ``"stochastic"``); its state (Adam's moments) is keyed by the
    shells and is fp32, as in classic mixed precision. Parameters are stepped a chunk at a time (a chunk
    is ``chunk_bytes`` of fp32 masters, or one tensor if it is larger), so the transient memory is
    bounded by the chunk: per element, 4 bytes for the rebuilt master and 4 for the upcast gradient while
    the wrapped optimizer steps (plus its own temporaries: one fp32 per element for foreach AdamW), then
    the gradient is freed and 4 + 1 bytes hold the int32 remainder and its overflow mask while rounding
    back. That is about 12 bytes per element of the largest chunk; ``benchmarks/bench_precision_gpu.py``
    measures it. Elementwise optimizers (SGD, Adam, AdamW, ...) give the same result chunked or not, and
    every chunk sees the same hyper-parameters because the chunks share the wrapped optimizer's
    ``param_groups``.

    Outside ``step()``/``state_dict()``/``load_state_dict()`` the ``param_groups`` hold the model's own
    parameters, so LR schedulers, ``transformers.Trainer`` and gradient clipping see what they expect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ipcbridge.errors import PrecisionError
from ipcbridge.guard import require_update
from ipcbridge.optim import batch
from ipcbridge.optim.slots import Slot, check_masters, load_masters, make_slot, pack_masters, reset_masters

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("remainder", "fp32", "stochastic")

#: fp32 bytes of master per chunk. Large enough that a 1B model steps in a handful of chunks (few
#: syncs, few kernel launches), small enough that the transient stays a few percent of an 80 GB GPU.
DEFAULT_CHUNK_BYTES = 512 << 20


class MasterWeights(torch.optim.Optimizer):
    """A wrapped optimizer that steps fp32 masters of bf16/fp16 parameters. Make one with :func:`master_weights`.

    Like accelerate's ``AcceleratedOptimizer``, it shares the wrapped optimizer's ``param_groups``,
    ``state`` and ``defaults`` rather than calling ``Optimizer.__init__``; step hooks belong on the
    wrapped optimizer (they run once per chunk). Step this object, never the wrapped one (that raises).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, mode: str = "remainder", *,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, seed: int | None = None) -> None:
        _check_wrappable(optimizer, mode, chunk_bytes)
        self.optimizer = optimizer
        self.mode = mode
        self.chunk_bytes = chunk_bytes
        self._slots: dict[int, Slot] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                self._slots[id(p)] = make_slot(p, mode)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._seed = seed if seed is not None else int(torch.initial_seed() % (1 << 62))
        self._stepping = False
        #: The chunks split this step whose exceptions are still on the device (batch.finish reads them).
        self._splits: list[tuple[list[Slot], batch.Split]] = []
        self._adopt_state()
        self._hook = optimizer.register_step_pre_hook(self._refuse_direct_step)
        setattr(optimizer, _WRAPPED, True)

    # -- what LR schedulers and Trainer read ---------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __repr__(self) -> str:
        return f"MasterWeights(mode={self.mode!r}, {self.optimizer!r})"

    def __getstate__(self) -> dict[str, Any]:
        raise PrecisionError("MasterWeights cannot be pickled (it holds the engine's live tensors); save "
                             "state_dict() instead and load it into a new master_weights(...)")

    def slots(self) -> list[Slot]:
        """The bookkeeping per model parameter, in ``param_groups`` order."""
        return [self._slots[id(p)] for group in self.param_groups for p in group["params"]]

    def extra_bytes(self) -> int:
        """Persistent bytes this wrapper keeps beyond the wrapped optimizer's own state."""
        total = 0
        for s in self.slots():
            if s.kind == "fp32":
                total += s.shell.numel() * 4
            elif s.kind == "remainder":
                assert s.remainder is not None and s.exceptions is not None
                total += s.remainder.numel() * 2 + len(s.exceptions) * 12
        return total

    # -- stepping --------------------------------------------------------------------------------

    def _refuse_direct_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._stepping:
            raise PrecisionError(
                f"{type(optimizer).__name__}.step() was called directly, but it is wrapped by "
                "ipcbridge.optim.master_weights; call step() on the wrapper it returned"
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One optimizer step on the fp32 masters; the served weights become their rounding."""
        require_update([s.param for s in self.slots()], f"{type(self.optimizer).__name__}.step()")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._splits = []
        try:
            for chunk in self._chunks():
                self._step_chunk(chunk)
        finally:  # even after a failed chunk: the ones before it wrote served weights and remainders
            done = batch.finish([split for _, split in self._splits])
            for (slots, _), exceptions in zip(self._splits, done, strict=True):
                for slot, exc in zip(slots, exceptions, strict=True):
                    slot.exceptions = exc
            self._splits = []
        return loss

    def _chunks(self) -> Iterator[list[Slot]]:
        chunk: list[Slot] = []
        size = 0
        for slot in self.slots():
            if slot.param.grad is None:
                continue
            if slot.param.grad.is_sparse:
                raise PrecisionError("master_weights does not support sparse gradients")
            if chunk and size + slot.transient_bytes > self.chunk_bytes:
                yield chunk
                chunk, size = [], 0
            chunk.append(slot)
            size += slot.transient_bytes
        if chunk:
            yield chunk

    def _step_chunk(self, chunk: list[Slot]) -> None:
        try:
            loaded = self._load(chunk)
            with self._as_shells(chunk):
                self._stepping = True
                try:
                    self.optimizer.step()
                finally:
                    self._stepping = False
            for slot in chunk:
                if slot.shell is not slot.param:
                    slot.shell.grad = None  # before rounding back: its memory is the remainders'
            self._store(chunk, loaded)
        finally:
            for slot in chunk:
                self._unload(slot)

    def _load(self, chunk: list[Slot]) -> dict[str, batch.Masters]:
        """Give each shell of ``chunk`` its fp32 master (rebuilt, for the modes that keep none whole) and
        its upcast gradient. Returns the rebuilt masters by mode, for :meth:`_store`."""
        stepped = [s for s in chunk if s.kind != "pass"]
        loaded = {}
        for kind in ("remainder", "stochastic"):
            slots = [s for s in stepped if s.kind == kind]
            if not slots:
                continue
            served = [s.param.detach() for s in slots]
            loaded[kind] = (batch.join(served, [s.remainder for s in slots], [s.exceptions for s in slots])  # type: ignore[misc]
                            if kind == "remainder" else batch.upcast(served))
            for slot, master in zip(slots, loaded[kind].tensors, strict=True):
                slot.shell.data = master
        grads = batch.upcast([s.param.grad for s in stepped])  # type: ignore[misc]  # _chunks() took slots with grads
        for slot, grad in zip(stepped, grads.tensors, strict=True):
            slot.shell.grad = grad
        return loaded

    def _store(self, chunk: list[Slot], loaded: dict[str, batch.Masters]) -> None:
        """Round the stepped masters back into the served weights (and keep the remainders)."""
        for slot in chunk:
            if slot.kind == "fp32":
                slot.param.detach().copy_(slot.shell.detach())  # round to nearest even, as classic mixed precision
        if "stochastic" in loaded:
            slots = [s for s in chunk if s.kind == "stochastic"]
            served = [s.param.detach() for s in slots]
            batch.stochastic_round(loaded["stochastic"], served, self._generator(served[0].device), self._kernel_seed())
        if "remainder" in loaded:
            slots = [s for s in chunk if s.kind == "remainder"]
            split = batch.split(loaded["remainder"], [s.param.detach() for s in slots],
                                [s.remainder for s in slots])  # type: ignore[misc]
            self._splits.append((slots, split))

    def _unload(self, slot: Slot) -> None:
        if slot.kind == "pass":
            return
        slot.shell.grad = None
        if slot.kind != "fp32":
            slot.shell.data = torch.empty(0, dtype=torch.float32, device=slot.param.device)

    def _kernel_seed(self) -> int:
        """A seed for one fused stochastic rounding, from a CPU generator (no device sync; resumable)."""
        return int(torch.randint(0, 1 << 62, (1,), generator=self._generator(torch.device("cpu"))))

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]

    @contextmanager
    def _as_shells(self, chunk: list[Slot] | None = None) -> Iterator[None]:
        """Show the wrapped optimizer the shells (of ``chunk`` only, if given) in place of the parameters."""
        keep = None if chunk is None else {id(s.param) for s in chunk}
        saved = [group["params"] for group in self.param_groups]
        try:
            for group, params in zip(self.param_groups, saved, strict=True):
                group["params"] = [self._slots[id(p)].shell for p in params if keep is None or id(p) in keep]
            yield
        finally:
            for group, params in zip(self.param_groups, saved, strict=True):
                group["params"] = params

    def _adopt_state(self) -> None:
        """Re-key state the wrapped optimizer already has (it stepped before) to the shells, in fp32."""
        for slot in self.slots():
            if slot.shell is slot.param or slot.param not in self.optimizer.state:
                continue
            state = self.optimizer.state.pop(slot.param)
            self.optimizer.state[slot.shell] = {
                k: v.to(torch.float32) if torch.is_tensor(v) and v.is_floating_point() and k != "step" else v
                for k, v in state.items()
            }

    # -- the rest of the Optimizer surface ---------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        for slot in self.slots():
            if slot.param.grad is None:
                continue
            if set_to_none:
                slot.param.grad = None
            else:
                slot.param.grad.detach_().zero_()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._slots[id(p)] = make_slot(p, self.mode)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus the masters (remainders, fp32 masters or RNG state)."""
        with self._as_shells():
            state = self.optimizer.state_dict()
        state[_KEY] = pack_masters(self.mode, self.slots(), self._generators)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; resuming from it continues the uninterrupted trajectory bit for bit."""
        state_dict = dict(state_dict)
        masters = state_dict.pop(_KEY, None)
        if masters is not None:
            check_masters(masters, self.mode, self.slots())
        with self._as_shells():  # torch checks its own part before it changes anything
            self.optimizer.load_state_dict(state_dict)
        if masters is not None:
            load_masters(masters, self.slots(), self._generators)
        else:
            logger.warning("loading an optimizer state dict without master weights: masters restart from "
                           "the served weights (save the state of master_weights(...), not of the optimizer)")
            reset_masters(self.slots())


_KEY = "ipcbridge_master_weights"
_WRAPPED = "_ipcbridge_master_weights"  # set on a wrapped optimizer: two wrappers would fight over its state


def _check_wrappable(optimizer: Any, mode: str, chunk_bytes: int) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, MasterWeights):
        raise PrecisionError(f"master_weights wraps a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                             "build the optimizer on bridge.model.parameters() and pass it")
    if mode not in MODES:
        raise PrecisionError(f"unknown master_weights mode {mode!r}; use one of {', '.join(map(repr, MODES))}")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise PrecisionError("master_weights cannot wrap LBFGS (its closure re-evaluates the model between "
                             "sub-steps, which would need the served weights rounded at each one)")
    if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes <= 0:
        raise PrecisionError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    if getattr(optimizer, _WRAPPED, False):
        raise PrecisionError("this optimizer is already wrapped by master_weights; wrap it once")


def master_weights(optimizer: torch.optim.Optimizer, mode: str = "remainder", *,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, seed: int | None = None) -> MasterWeights:
    """Wrap ``optimizer`` so that bf16/fp16 parameters train like fp32 (Note [master weights without a
    second copy]).

    ``optimizer`` is any ``torch.optim.Optimizer`` built on an attached model's parameters (or any
    model's). ``mode``: ``"remainder"`` (exact fp32 masters, +2 bytes/param), ``"fp32"`` (exact, +4),
    ``"stochastic"`` (unbiased stochastic rounding, +0; ``seed`` seeds it). Step, zero and save the
    returned object; its ``step()`` must run inside ``with bridge.update():`` for an attached model.
    """
    return MasterWeights(optimizer, mode, chunk_bytes=chunk_bytes, seed=seed)
