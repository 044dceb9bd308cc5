"""A ``transformers.Trainer`` callback that fences every optimizer step, and every other write the Trainer
makes to the weights, against the engine.

    bridge = ipcbridge.connect(engine)
    trainer = Trainer(model=bridge.model, args=..., train_dataset=...,
                      callbacks=[BridgeCallback(bridge)])
    trainer.train()          # each optimizer.step() writes the served weights, fenced

Note [fencing the Trainer's step]
    The fence must cover exactly ``optimizer.step()`` and must end even when the step raises. Trainer's
    ``on_pre_optimizer_step``/``on_optimizer_step`` events bracket the step, but no event follows a step
    that raises (nor does ``on_train_end``), so a fence opened in the one and closed in the other would
    leave the engine paused until its lease ran out. So at ``on_train_begin`` the callback wraps the
    Trainer's optimizer's ``step`` in ``with bridge.update():``, and ``on_train_end`` unwraps it. Callbacks
    are not handed the Trainer (and ``optimizer`` is ``None`` unless the user built it), so
    :func:`_calling_trainer` finds the Trainer whose callback handler is calling: the one place that
    depends on how Trainer calls its callbacks. Gradient clipping happens before the step, so the engine is
    paused only for the step itself.

Note [the Trainer's other weight writes]
    transformers 5's Trainer writes the model's weights outside the optimizer step in private methods
    with no callback event around them: ``_load_from_checkpoint`` (``train(resume_from_checkpoint=...)``,
    which runs *before* ``on_train_begin``), ``_load_best_model`` (``load_best_model_at_end``) and
    ``_sync_replicated_trainable_parameters`` (a broadcast from rank 0 into ``param.data`` for models
    sharded at load time). :func:`fence_weight_writes` replaces them on the Trainer instance with versions
    that run inside ``bridge.update()``; it runs at ``on_init_end``, the one event before ``train()``, and
    again at ``on_train_begin`` for a callback added later with ``add_callback`` (too late for a resume:
    that load then raises the guard's ``BridgeError``, Note [the step guard], saying to pass the callback to
    ``Trainer(callbacks=...)``). A release that renames them loses only the fence, not the guard. Evaluation
    with ``fp16_full_eval``/``bf16_full_eval`` casts the model (a copy out of the engine's memory), so it is
    refused at once.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from ipcbridge.bridge import Bridge
from ipcbridge.errors import BridgeError
from ipcbridge.integrations import refuse_second_engine

#: The Trainer's private methods that write the weights outside the optimizer step (transformers 5.x;
#: Note [the Trainer's other weight writes]).
TRAINER_WEIGHT_WRITERS = ("_load_from_checkpoint", "_load_best_model", "_sync_replicated_trainable_parameters")


def _calling_trainer() -> Trainer | None:
    """The Trainer up the call stack (its ``self``), or ``None``. See Note [fencing the Trainer's step]."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def fence_weight_writes(trainer: Trainer, bridge: Bridge) -> None:
    """Run each of :data:`TRAINER_WEIGHT_WRITERS` the Trainer has inside ``bridge.update()``, once (on the
    instance, not the class). See Note [the Trainer's other weight writes]."""
    for name in TRAINER_WEIGHT_WRITERS:
        method = getattr(trainer, name, None)
        if method is None or getattr(method, "ipcbridge_fenced", False):
            continue

        def fenced(*args: Any, _method: Callable[..., Any] = method, **kwargs: Any) -> Any:
            with bridge.update():
                return _method(*args, **kwargs)

        functools.update_wrapper(fenced, method)
        fenced.ipcbridge_fenced = True  # type: ignore[attr-defined]
        setattr(trainer, name, fenced)


def _check_args(args: Any, bridge: Bridge) -> None:
    """Refuse settings that make the Trainer cast the model itself (a copy out of the engine's memory)."""
    model = bridge.model
    if args is None or model is None:
        return
    dtype = next(model.parameters()).dtype
    for flag, wanted in (("fp16_full_eval", torch.float16), ("bf16_full_eval", torch.bfloat16)):
        if getattr(args, flag, False) and dtype != wanted:
            raise BridgeError(
                f"TrainingArguments({flag}=True) casts the model to {wanted} for evaluation, which copies its "
                f"weights out of the engine's memory ({dtype}) for good; turn {flag} off"
            )


class BridgeCallback(TrainerCallback):
    """Wrap each optimizer step of a ``Trainer`` in ``bridge.update()`` (Note [fencing the Trainer's step]).

    The Trainer must train ``bridge.model`` itself (not a copy): the callback checks at init and at train
    start that the model's parameters are still the engine's memory. It also fences the Trainer's
    checkpoint loads (Note [the Trainer's other weight writes]); pass it to ``Trainer(callbacks=[...])``
    rather than ``add_callback`` so that ``train(resume_from_checkpoint=...)`` is fenced too.
    """

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        #: (optimizer, our wrapper, its own ``step`` attribute if it had one).
        self._wrapped: tuple[Any, Callable[..., Any], Any] | None = None

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._prepare(args, model)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        trainer = self._prepare(args, model)
        # Here, not in on_init_end: TRL builds its own vLLM engine after that has fired.
        refuse_second_engine(trainer, self.bridge)
        if self.bridge.unfenced_writes():
            # Weights written before training began, outside any fence: publish them now (the engine drops
            # its stale KV and moves its version); update() logs which.
            with self.bridge.update():
                pass
        optimizer = getattr(trainer, "optimizer", None) or kwargs.get("optimizer")
        if optimizer is None:
            raise BridgeError(
                "BridgeCallback found no Trainer optimizer to fence; pass it to a transformers.Trainer: "
                "Trainer(model=bridge.model, ..., callbacks=[BridgeCallback(bridge)])"
            )
        self._fence_steps(optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._unwrap()

    def _prepare(self, args: Any, model: Any) -> Trainer | None:
        """The checks and the load fences of Note [the Trainer's other weight writes]; the calling Trainer."""
        self._check_model(model)
        _check_args(args, self.bridge)
        trainer = _calling_trainer()
        if trainer is not None:
            fence_weight_writes(trainer, self.bridge)
        return trainer

    def _check_model(self, model: Any) -> None:
        # The Trainer may hand over its wrapper (DDP and friends keep the model as ``.module``).
        if model is not None and self.bridge.model not in (model, getattr(model, "module", None)):
            raise BridgeError(
                "the Trainer trains another model than bridge.model; pass model=bridge.model to Trainer, "
                "otherwise its steps never reach the engine"
            )
        moved = self.bridge.parameters_outside_engine()
        if moved:
            raise BridgeError(
                f"{moved[:4]} no longer lie in the engine's memory (the Trainer moved or cast the model?); keep "
                "the model on the engine's device and dtype (no --fp16/--bf16 casting, no model.to())"
            )

    def _fence_steps(self, optimizer: Any) -> None:
        self._unwrap()
        step, own = optimizer.step, vars(optimizer).get("step")
        bridge = self.bridge

        @functools.wraps(step)
        def fenced_step(*args: Any, **kwargs: Any) -> Any:
            with bridge.update():
                return step(*args, **kwargs)

        optimizer.step = fenced_step
        self._wrapped = (optimizer, fenced_step, own)

    def _unwrap(self) -> None:
        if self._wrapped is not None:
            optimizer, fenced_step, own = self._wrapped
            self._wrapped = None
            if vars(optimizer).get("step") is fenced_step:
                if own is None:
                    del optimizer.step  # the class's step again
                else:
                    optimizer.step = own
