"""A ``transformers.Trainer`` callback that fences every optimizer step against the engine.

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
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from transformers import Trainer, TrainerCallback

from ipcbridge.bridge import Bridge
from ipcbridge.errors import BridgeError


def _calling_trainer() -> Trainer | None:
    """The Trainer up the call stack (its ``self``), or ``None``. See Note [fencing the Trainer's step]."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


class BridgeCallback(TrainerCallback):
    """Wrap each optimizer step of a ``Trainer`` in ``bridge.update()`` (Note [fencing the Trainer's step]).

    The Trainer must train ``bridge.model`` itself (not a copy): the callback checks at train start that
    the model's parameters are still the engine's memory.
    """

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        #: (optimizer, our wrapper, its own ``step`` attribute if it had one).
        self._wrapped: tuple[Any, Callable[..., Any], Any] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._check_model(model)
        trainer = _calling_trainer()
        optimizer = getattr(trainer, "optimizer", None) or kwargs.get("optimizer")
        if optimizer is None:
            raise BridgeError(
                "BridgeCallback found no Trainer optimizer to fence; pass it to a transformers.Trainer: "
                "Trainer(model=bridge.model, ..., callbacks=[BridgeCallback(bridge)])"
            )
        self._fence_steps(optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._unwrap()

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
