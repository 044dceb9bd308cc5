"""The step guard: which parameters alias an engine through an open (or closed) Bridge, and the global
optimizer-step pre-hook that refuses to write them outside ``bridge.update()``.

Note [the step guard]
    An optimizer step on an attached model writes the engine's weights. Outside ``with bridge.update():``
    nothing pauses the engine (it may generate from half-written weights), nothing drops its prefix cache
    (old KV then mixes with new weights in one generation) and the weight version does not move.

    Why one global pre-hook: torch runs the hooks of ``torch.optim.optimizer.register_optimizer_step_pre_hook``
    before the ``step()`` of every ``torch.optim.Optimizer`` (``Optimizer.__init__`` wraps each subclass's
    ``step`` once): torch's own optimizers, a user's subclass, bitsandbytes', and the wrappers of
    transformers and accelerate (``AcceleratedOptimizer.step`` calls the wrapped optimizer's ``step``). One
    hook sees them all, whoever built the optimizer and whenever; a per-optimizer hook would miss every
    optimizer built after ``connect()``. It is installed once, when the first Bridge registers parameters
    (importing ipcbridge changes nothing). Per step it looks each parameter of the optimizer up in a dict
    keyed by ``id`` (about 0.1 µs each: a few hundred lookups for a large model); while no bridge ever
    registered parameters, one truth test.

    What it refuses: a step on a parameter whose Bridge is not inside ``update()`` *in the stepping thread*,
    and any step on a parameter of a closed Bridge. The thread matters: the engine is paused for the block,
    and only a step made by the block's own thread is known to have finished when the block ends and the
    engine resumes (a step handed to another thread may still be writing). So ``with bridge.update():``
    and the step run in one thread; to keep an event loop free, move the whole block into a thread
    (``await asyncio.to_thread(train_step)``). Parameters of no Bridge pass: ``ipcbridge.attach()`` without
    ``connect``, a stream bridge's trainer-owned weights, ``ipcbridge.optim``'s fp32 masters.

    What it can't see, and what covers it:
    - writes outside any ``torch.optim.Optimizer`` (a hand-written update, ``with torch.no_grad(): p.add_()``):
      they move torch's version counter of the parameter, which :class:`Watch` compares with its count at
      the last fence: ``update()`` logs a warning naming them, ``Bridge.check()`` names them in a hint.
      Writes through ``p.data`` move no counter; ``check()``'s logprob parity catches their effect on an
      engine whose prefix cache went stale.
    - ``model.load_state_dict`` (it copies into the aliases): :func:`guard_loads` puts the same check in a
      load_state_dict pre-hook of the attached model. ``BridgeCallback`` fences ``transformers.Trainer``'s
      checkpoint loads.
    - casts, resizes, copies and replaced parameters break the alias rather than the fence: ``update()``
      checks the aliases before it pauses (:meth:`Watch.moved`).
    - tensors taken from a parameter before ``close()`` (``p.detach()``, ``p.data``, a view, the saved
      tensors of an autograd graph not yet backpropagated) keep the engine's memory mapped and writable:
      ``close()`` cannot revoke them (Note [close detaches the model]).
    An optimizer that steps copies of the aliased weights (``ipcbridge.optim``'s masters) calls
    :func:`require_update` itself, for the aliased parameters it writes back.

Note [close detaches the model]
    After ``Bridge.close()`` the old model and optimizer must not reach the engine. Each parameter's data is
    rebound (``p.data = ...``: the very Parameter objects the optimizer holds, ties included) to one NaN
    element broadcast to its shape (stride 0): shape, dtype, device and ``requires_grad`` stay, one element
    of memory per dtype and device is used, and every in-place write (``optimizer.step()``, ``copy_``,
    ``add_``) raises torch's "more than one element of the written-to tensor refers to a single memory
    location". ``torch.empty_like(p, device="meta")`` would be free, but torch 2.13 refuses ``p.data =``
    a tensor of another device type; an empty tensor would change the shape; a copy would double the
    memory. A forward pre-hook on every module then raises :class:`BridgeError` saying how to get a new
    model, and the guard refuses steps (closed bridge). With the views gone the engine's memory is
    unmapped when the Attachment closes.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from ipcbridge._torch import tensor_version
from ipcbridge.errors import BridgeError


class Owner:
    """What the guard knows of one Bridge: a name for messages, whether it is closed, and which thread is
    inside its ``update()`` (Note [the step guard]). Holds no tensor, model or bridge."""

    __slots__ = ("__weakref__", "_thread_name", "closed", "name", "orphaned", "thread")

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False
        #: The Bridge was garbage-collected without close() (its model may still alias the engine).
        self.orphaned = False
        #: ``threading.get_ident()`` of the thread inside ``update()``, or ``None``.
        self.thread: int | None = None
        self._thread_name = ""

    def enter(self) -> None:
        self._thread_name = threading.current_thread().name
        self.thread = threading.get_ident()

    def leave(self) -> None:
        self.thread = None

    def orphan(self) -> None:
        self.orphaned = True

    def refusal(self, what: str) -> str:
        """Why ``what`` may not write this owner's parameters now, and the fix."""
        if self.closed:
            return (
                f"{what} would write parameters of a Bridge that was closed ({self.name}): after close() the old "
                "model and optimizer no longer hold the engine's weights. Reconnect with ipcbridge.connect(...) "
                "and build a new optimizer on the new bridge.model"
            )
        if self.thread is not None:
            return (
                f"{what} runs in thread {threading.current_thread().name!r}, but `update()` of {self.name} is held "
                f"by thread {self._thread_name!r}: the engine resumes when that block ends, whether or not this "
                "step has finished. Run `with bridge.update(): optimizer.step()` in one thread"
            )
        gone = (" The Bridge that attached them was garbage-collected: keep a reference to it"
                if self.orphaned else "")
        return (
            f"{what} writes parameters that are the engine's weights ({self.name}) outside `update()`: the engine "
            "could generate from half-written weights, keep KV computed with the old ones in its prefix cache, "
            "and would not move its weight version. Wrap the step in `with bridge.update():` (for "
            f"transformers.Trainer: Trainer(..., callbacks=[BridgeCallback(bridge)])).{gone}"
        )


# ---- the registry ------------------------------------------------------------------------------------

#: id(parameter) -> (weak reference to it, its owner). Keyed by ``id``: tensors compare elementwise, so a
#: WeakKeyDictionary (which compares keys with ``==``) cannot hold them. A reference's callback drops its
#: entry, so the registry keeps no model alive; the owners it holds are a few attributes each.
_PARAMS: dict[int, tuple[weakref.ref[torch.Tensor], Owner]] = {}
#: Reentrant: a weak reference's callback may run (garbage collection) while this thread registers.
_LOCK = threading.RLock()
_HOOK: RemovableHandle | None = None


def _forget(key: int, ref: weakref.ref[torch.Tensor]) -> None:
    with _LOCK:
        entry = _PARAMS.get(key)
        if entry is not None and entry[0] is ref:
            del _PARAMS[key]


def register(params: Iterable[torch.Tensor], owner: Owner) -> None:
    """Guard ``params`` as ``owner``'s (the Note); installs the global step pre-hook on first use."""
    global _HOOK
    with _LOCK:
        for p in params:
            key = id(p)
            entry = _PARAMS.get(key)
            if entry is not None and entry[0]() is p and entry[1] is owner:
                continue
            _PARAMS[key] = (weakref.ref(p, functools.partial(_forget, key)), owner)
        if _HOOK is None:
            _HOOK = register_optimizer_step_pre_hook(_step_pre_hook)


def owned_by(owner: Owner) -> list[torch.Tensor]:
    """The live parameters registered to ``owner`` (those replaced in the model but still held elsewhere too)."""
    with _LOCK:
        refs = [ref for ref, o in _PARAMS.values() if o is owner]
    return [p for p in (ref() for ref in refs) if p is not None]


def require_update(params: Iterable[torch.Tensor], what: str = "optimizer.step()") -> None:
    """Raise :class:`BridgeError` if any of ``params`` belongs to a Bridge that is closed, or that is not
    inside ``update()`` in this thread (Note [the step guard]); parameters of no Bridge pass.

    For code that writes attached parameters outside a ``torch.optim.Optimizer`` step (the global hook
    covers those): call it before writing. ``what`` names the write in the message.
    """
    if not _PARAMS:
        return
    me = threading.get_ident()
    get = _PARAMS.get
    for p in params:
        entry = get(id(p))
        if entry is None or entry[1].thread == me:  # inside update() in this thread: never closed
            continue
        if entry[0]() is p:  # not a stale id of a parameter that is gone
            raise BridgeError(entry[1].refusal(what))


def _step_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if _PARAMS:
        what = f"{type(optimizer).__name__}.step()"
        for group in optimizer.param_groups:
            require_update(group["params"], what)


def guard_loads(model: nn.Module) -> RemovableHandle:
    """Run :func:`require_update` before ``model.load_state_dict`` writes its parameters (the Note)."""

    def before_load(module: nn.Module, *args: Any) -> None:
        require_update(module.parameters(), f"{type(module).__name__}.load_state_dict()")

    return model.register_load_state_dict_pre_hook(before_load)


# ---- what the model aliases, per update ----------------------------------------------------------------


class _Alias:
    """One parameter as attach (or the last fence) left it: the object, its memory, its write counter."""

    __slots__ = ("dtype", "param", "ptr", "shape", "stride", "version")

    def __init__(self, p: torch.Tensor) -> None:
        self.param = p
        self.ptr, self.dtype, self.shape, self.stride = p.data_ptr(), p.dtype, p.shape, p.stride()
        self.version = tensor_version(p)

    def same_memory(self, p: torch.Tensor) -> bool:
        return (p.data_ptr() == self.ptr and p.dtype == self.dtype and p.shape == self.shape
                and p.stride() == self.stride)


def module_slots(module: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """``module``'s own child-module and parameter dicts, the ones ``named_parameters()`` walks (torch private
    attributes ``_modules`` and ``_parameters``; Note [the alias check without a walk])."""
    return module._modules, module._parameters


class Watch:
    """The attached model's parameters as attached: checked before every fence, re-counted after it.

    :meth:`moved` is ``update()``'s alias check (a cast, resize, copy or replacement of a parameter);
    :meth:`written` names parameters written in place since the last fence (Note [the step guard]).

    Note [the alias check without a walk]
        ``update()`` checks every parameter before it pauses. Through ``named_parameters()``, which rebuilds
        every name in nested generators, that took 1.1 ms for a 32-layer Llama (423 modules, 291 parameters,
        the shape of an 8B model; CPU, torch 2.13, Python 3.11): more than vLLM's ``LLM`` fence RPC. So the
        watch keeps, from attach, each module's children (the objects) and parameter names. While every
        module has exactly those (0.07 ms to compare), the model's named parameters are the recorded names,
        each read from its module's dict, and the whole check takes about 0.2 ms. Anything else (a module
        replaced, added or removed, a parameter registered or deleted, another model object) takes the walk,
        which names what changed; a walk that finds every parameter in place remembers the new layout.
    """

    def __init__(self, model: nn.Module) -> None:
        self._by_name: dict[str, _Alias] = {}
        seen: dict[int, _Alias] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self._by_name[name] = seen.setdefault(id(p), _Alias(p))  # ties share one entry
        self._distinct = list(seen.values())
        self._remember_layout(model)

    def _remember_layout(self, model: nn.Module) -> None:
        """Note [the alias check without a walk]: the modules' children and parameter names as they are now."""
        self._root = model
        self._layout = [(m, dict(children), set(params)) for m in model.modules()
                        for children, params in [module_slots(m)]]
        # (name, its module, key), in named_parameters(remove_duplicate=False)'s order. The module, not its
        # dict: a dict swapped for another with the same keys must be read, not the one remembered.
        self._slots = [(f"{prefix}.{key}" if prefix else key, m, key)
                       for prefix, m in model.named_modules(remove_duplicate=False)
                       for key, p in module_slots(m)[1].items() if p is not None]

    @property
    def params(self) -> list[torch.Tensor]:
        return [a.param for a in self._distinct]

    def moved(self, model: nn.Module, adopt: Callable[[torch.Tensor], None] | None = None) -> list[str]:
        """Names of ``model``'s parameters that no longer alias what was attached, plus attached names the
        model lost. A new Parameter object over the very same memory is not moved: it is adopted (``adopt(p)``
        registers it with the guard) and watched from now on."""
        if model is not self._root or not self._same_layout():
            return self._moved_walk(model, adopt)
        bad: list[str] = []
        for name, m, key in self._slots:
            p, a = module_slots(m)[1][key], self._by_name[name]
            if p is None or not a.same_memory(p):
                bad.append(name)
            elif a.param is not p:
                self._adopt(name, p, adopt)
        return bad

    def _same_layout(self) -> bool:
        for m, children, params in self._layout:
            now_children, now_params = module_slots(m)
            if now_children != children or now_params.keys() != params:
                return False
        return True

    def _moved_walk(self, model: nn.Module, adopt: Callable[[torch.Tensor], None] | None) -> list[str]:
        bad: list[str] = []
        known = 0
        for name, p in model.named_parameters(remove_duplicate=False):
            a = self._by_name.get(name)
            known += a is not None
            if a is None or not a.same_memory(p):
                bad.append(name)
            elif a.param is not p:
                self._adopt(name, p, adopt)
        if known != len(self._by_name):  # some attached names are gone (a module replaced or removed)
            present = {n for n, _ in model.named_parameters(remove_duplicate=False)}
            bad += [n for n in self._by_name if n not in present]
        if not bad:  # the same parameters under the same names: the next check may skip the walk again
            self._remember_layout(model)
        return bad

    def _adopt(self, name: str, p: torch.Tensor, adopt: Callable[[torch.Tensor], None] | None) -> None:
        old = self._by_name[name]
        self._by_name[name] = a = _Alias(p)
        self._distinct.append(a)
        if all(other is not old for other in self._by_name.values()):  # no tie left on the old object
            self._distinct.remove(old)
        if adopt is not None:
            adopt(p)

    def written(self) -> list[str]:
        """Names of parameters written in place since the last :meth:`recount` (or attach); a tensor sharing
        their memory counts (q/k/v are views of one fused tensor, with one counter)."""
        changed = {id(a) for a in self._distinct if tensor_version(a.param) != a.version}
        if not changed:
            return []
        return [n for n, a in self._by_name.items() if id(a) in changed]

    def recount(self) -> None:
        """Take the write counters as they are now (at the end of each fence)."""
        for a in self._distinct:
            a.version = tensor_version(a.param)


def detach(model: nn.Module, params: Iterable[torch.Tensor], how_to_reconnect: str) -> None:
    """Make ``params`` stop aliasing anything and ``model`` refuse forwards (Note [close detaches the model])."""
    dead: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
    for p in params:
        key = (p.dtype, p.device)
        if key not in dead:
            fill = float("nan") if p.dtype.is_floating_point or p.dtype.is_complex else 0
            dead[key] = torch.full((), fill, dtype=p.dtype, device=p.device)
        p.data = dead[key].expand(p.shape)

    def refuse_forward(module: nn.Module, args: Any) -> None:
        raise BridgeError(
            f"this {type(module).__name__} was detached from the engine by bridge.close(): its parameters no "
            f"longer hold the engine's weights. {how_to_reconnect}"
        )

    for module in model.modules():
        module.register_forward_pre_hook(refuse_forward)
