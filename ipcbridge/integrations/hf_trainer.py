"""A ``transformers.Trainer`` callback that fences every optimizer step against the engine.

    bridge = ipcbridge.connect(engine)
    trainer = Trainer(model=bridge.model, args=..., train_dataset=...,
                      callbacks=[BridgeCallback(bridge)])
    trainer.train()          # each optimizer.step() writes the served weights, fenced

Trainer calls ``on_pre_optimizer_step`` right before ``optimizer.step()`` and ``on_optimizer_step`` right
after it, which is exactly the window :meth:`Bridge.update` must cover. Gradient clipping happens before
the pause, so the engine is paused only for the step itself.
"""

from __future__ import annotations

import contextlib
from typing import Any

from transformers import TrainerCallback

from ipcbridge.bridge import Bridge
from ipcbridge.errors import BridgeError


class BridgeCallback(TrainerCallback):
    """Wrap each optimizer step of a ``Trainer`` in ``bridge.update()``.

    The Trainer must train ``bridge.model`` itself (not a copy): the callback checks at train start that
    the model's parameters are still the engine's memory.
    """

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self._fence: contextlib.ExitStack | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and model is not self.bridge.model:
            unwrapped = getattr(model, "module", model)
            if unwrapped is not self.bridge.model:
                raise BridgeError(
                    "the Trainer trains another model than bridge.model; pass model=bridge.model to Trainer, "
                    "otherwise its steps never reach the engine"
                )
        att = self.bridge._model().ipcbridge_attachment
        moved = [n for n, p in self.bridge._model().named_parameters() if not att.owns(p)]
        if moved:
            raise BridgeError(
                f"{moved[:4]} no longer lie in the engine's memory (the Trainer moved or cast the model?); keep "
                "the model on the engine's device and dtype (no --fp16/--bf16 casting, no model.to())"
            )

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_fence()
        stack = contextlib.ExitStack()
        stack.enter_context(self.bridge.update())
        self._fence = stack

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_fence()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_fence()  # never leave the engine paused, whatever happened in between

    def _close_fence(self) -> None:
        if self._fence is not None:
            fence, self._fence = self._fence, None
            fence.close()
