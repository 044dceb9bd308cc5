"""What keeps each parameter's master (a :class:`Slot`), and the masters' part of a state dict.

Slots are numbered like ``torch.optim.Optimizer.state_dict`` numbers parameters (in ``param_groups``
order), so the two parts of one state dict agree. Unpacking validates everything before it writes
anything: a state dict of another mode, model or dtype leaves the wrapper as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ipcbridge.errors import PrecisionError
from ipcbridge.optim.codec import HALF_DTYPES, Exceptions

FORMAT = 1


@dataclass
class Slot:
    """One model parameter and what keeps its master. ``kind`` is a mode, or ``"pass"`` for fp32 weights."""

    param: torch.Tensor
    shell: torch.Tensor
    kind: str
    remainder: torch.Tensor | None = None
    exceptions: Exceptions | None = None

    @property
    def transient_bytes(self) -> int:
        return 0 if self.kind in ("pass", "fp32") else 4 * self.param.numel()


def empty_shell(param: torch.Tensor) -> torch.Tensor:
    return nn.Parameter(torch.empty(0, dtype=torch.float32, device=param.device), requires_grad=False)


def make_slot(param: torch.Tensor, mode: str) -> Slot:
    if param.dtype not in HALF_DTYPES:
        return Slot(param, param, "pass")
    if mode == "fp32":
        return Slot(param, nn.Parameter(param.detach().to(torch.float32, copy=True), requires_grad=False), "fp32")
    if mode == "stochastic":
        return Slot(param, empty_shell(param), "stochastic")
    return Slot(param, empty_shell(param), "remainder", torch.zeros_like(param, dtype=torch.int16),
                Exceptions.none(param.device))


def pack_masters(mode: str, slots: list[Slot], generators: dict[torch.device, torch.Generator]) -> dict[str, Any]:
    """What resuming needs beyond the wrapped optimizer's state: remainders, fp32 masters or RNG states."""
    packed: dict[int, dict[str, torch.Tensor]] = {}
    for i, slot in enumerate(slots):
        if slot.kind == "remainder":
            assert slot.remainder is not None and slot.exceptions is not None
            packed[i] = {"remainder": slot.remainder, "exception_index": slot.exceptions.index,
                         "exception_value": slot.exceptions.value}
        elif slot.kind == "fp32":
            packed[i] = {"master": slot.shell.detach()}
    return {"format": FORMAT, "mode": mode, "slots": packed,
            "generators": {str(d): g.get_state() for d, g in generators.items()}}


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise PrecisionError(f"master_weights state dict: {what}; load a state_dict() saved by master_weights "
                             "on the same model and mode")


def _check_slot(i: int, slot: Slot, entry: Any) -> None:
    if slot.kind == "remainder":
        _expect(isinstance(entry, dict) and set(entry) == {"remainder", "exception_index", "exception_value"},
                f"slot {i} must hold a remainder and its exceptions")
        r = entry["remainder"]
        _expect(torch.is_tensor(r) and r.dtype == torch.int16 and r.shape == slot.param.shape,
                f"slot {i}'s remainder must be int16 of shape {tuple(slot.param.shape)}")
        idx, val = entry["exception_index"], entry["exception_value"]
        _expect(torch.is_tensor(idx) and torch.is_tensor(val) and idx.dtype == torch.int64
                and val.dtype == torch.float32 and idx.dim() == 1 and idx.shape == val.shape,
                f"slot {i}'s exceptions must be 1-D int64 indices and float32 values of one length")
        _expect(idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < slot.param.numel()),
                f"slot {i}'s exception indices must lie in [0, {slot.param.numel()})")
    elif slot.kind == "fp32":
        _expect(isinstance(entry, dict) and set(entry) == {"master"}, f"slot {i} must hold an fp32 master")
        m = entry["master"]
        _expect(torch.is_tensor(m) and m.dtype == torch.float32 and m.shape == slot.param.shape,
                f"slot {i}'s master must be float32 of shape {tuple(slot.param.shape)}")
    else:
        _expect(entry is None, f"slot {i} is a {slot.param.dtype} parameter with no master, but the state "
                               "dict has one")


def check_masters(packed: Any, mode: str, slots: list[Slot]) -> None:
    """Refuse ``packed`` unless all of it fits ``slots`` (:func:`load_masters` then cannot fail half-way)."""
    _expect(isinstance(packed, dict) and packed.get("format") == FORMAT,
            f"unknown format {packed.get('format') if isinstance(packed, dict) else packed!r} (expected {FORMAT})")
    if packed.get("mode") != mode:
        raise PrecisionError(f"this state dict was saved by master_weights(mode={packed.get('mode')!r}) but is "
                             f"loaded into mode={mode!r}; wrap the optimizer with mode={packed.get('mode')!r} "
                             "to resume it")
    entries, gens = packed.get("slots"), packed.get("generators")
    _expect(isinstance(entries, dict) and isinstance(gens, dict), "'slots' and 'generators' must be dicts")
    _expect(set(entries) <= set(range(len(slots))), f"slot numbers must lie in [0, {len(slots)})")
    for i, slot in enumerate(slots):
        _check_slot(i, slot, entries.get(i))
    for name, rng in gens.items():
        _expect(isinstance(name, str) and torch.is_tensor(rng) and rng.dtype == torch.uint8,
                "'generators' must map device names to uint8 RNG states")


def load_masters(packed: dict[str, Any], slots: list[Slot], generators: dict[torch.device, torch.Generator]) -> None:
    """Load what :func:`check_masters` accepted into ``slots`` and ``generators``."""
    entries = packed["slots"]
    for i, slot in enumerate(slots):
        entry = entries.get(i)
        if slot.kind == "remainder":
            assert slot.remainder is not None
            slot.remainder.copy_(entry["remainder"])
            dev = slot.param.device
            slot.exceptions = Exceptions(entry["exception_index"].to(dev), entry["exception_value"].to(dev))
        elif slot.kind == "fp32":
            slot.shell.detach().copy_(entry["master"])
    for name, rng in packed["generators"].items():
        device = torch.device(name)
        generators.setdefault(device, torch.Generator(device=device)).set_state(rng)


def reset_masters(slots: list[Slot]) -> None:
    """Masters equal to the served weights again (a state dict without masters was loaded)."""
    for slot in slots:
        if slot.kind == "remainder":
            assert slot.remainder is not None
            slot.remainder.zero_()
            slot.exceptions = Exceptions.none(slot.param.device)
        elif slot.kind == "fp32":
            slot.shell.detach().copy_(slot.param.detach())
