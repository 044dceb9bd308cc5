"""master_weights: element-for-element classic mixed precision, bit-exact resume, and loud misuse.

The reference everywhere is classic mixed precision: a separate fp32 master per weight, the same
optimizer on the masters, the bf16/fp16 weights their round-to-nearest copy after each step.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from ipcbridge import PrecisionError
from ipcbridge.optim import master_weights
from ipcbridge.optim.codec import join_master
from tests.helpers import reference_model, tiny_config
from tests.optim.reference import ClassicMixedPrecision

STEPS = 30


def tiny_llama(dtype: torch.dtype) -> torch.nn.Module:
    return reference_model(tiny_config("llama", tied=True)).to(dtype)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(step))


def backward(model: torch.nn.Module, step: int) -> None:
    model.zero_grad(set_to_none=True)
    tokens = batch(step).to(next(model.parameters()).device)
    model(input_ids=tokens, labels=tokens).loss.backward()


def adamw(params, lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.1)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["remainder", "fp32"])
@pytest.mark.parametrize("lr", [1e-5, 1e-3])
def test_equals_classic_mixed_precision_element_for_element(dtype, mode, lr):
    ours, theirs = tiny_llama(dtype), tiny_llama(dtype)
    opt = master_weights(adamw(ours.parameters(), lr), mode, chunk_bytes=64 * 1024)  # many chunks
    ref = ClassicMixedPrecision(theirs, lambda masters: adamw(masters, lr))
    exceptions = 0
    for step in range(STEPS):
        backward(ours, step)
        backward(theirs, step)
        opt.step()
        ref.step()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert torch.equal(bits(a), bits(b)), f"step {step}: served weights differ"
        if mode == "remainder":
            exceptions += sum(len(s.exceptions) for s in opt.slots())
            for slot, m in zip(opt.slots(), ref.masters, strict=True):
                assert torch.equal(bits(join_master(slot.param.detach(), slot.remainder, slot.exceptions)), bits(m))
    if mode == "remainder" and dtype == torch.bfloat16 and lr == 1e-3:
        assert exceptions > 0  # round-to-nearest-even ties happened and were kept exact


def test_plain_bf16_loses_small_updates_that_master_weights_keep():
    plain, ours = tiny_llama(torch.bfloat16), tiny_llama(torch.bfloat16)
    start = [p.detach().clone() for p in plain.parameters()]
    opt_plain, opt_ours = adamw(plain.parameters(), 1e-6), master_weights(adamw(ours.parameters(), 1e-6))
    for step in range(8):
        for model, opt in ((plain, opt_plain), (ours, opt_ours)):
            backward(model, step)
            opt.step()
    norm = next(n for n, _ in plain.named_parameters() if n.endswith("norm.weight"))
    idx = [n for n, _ in plain.named_parameters()].index(norm)
    assert torch.equal(dict(plain.named_parameters())[norm], start[idx])  # rounded away, every step
    masters = join_master(opt_ours.slots()[idx].param.detach(), opt_ours.slots()[idx].remainder,
                          opt_ours.slots()[idx].exceptions)
    assert not torch.equal(masters, start[idx].float())  # the master moved


@pytest.mark.parametrize("mode", ["remainder", "fp32", "stochastic"])
def test_resume_from_state_dict_reproduces_the_uninterrupted_trajectory(mode):
    a = tiny_llama(torch.bfloat16)
    opt = master_weights(adamw(a.parameters()), mode, seed=3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    saved_weights, saved_opt = None, None
    for step in range(12):
        if step == 6:
            saved_weights = copy.deepcopy(a.state_dict())
            buf = io.BytesIO()
            torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
            saved_opt = buf.getvalue()
        backward(a, step)
        opt.step()
        sched.step()

    b = tiny_llama(torch.bfloat16)
    b.load_state_dict(saved_weights)
    opt_b = master_weights(adamw(b.parameters()), mode)
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 1.0 / (1 + s))
    loaded = torch.load(io.BytesIO(saved_opt), weights_only=True)
    opt_b.load_state_dict(loaded["opt"])
    sched_b.load_state_dict(loaded["sched"])
    for step in range(6, 12):
        backward(b, step)
        opt_b.step()
        sched_b.step()
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(bits(x), bits(y))


def test_fp32_parameters_pass_through_to_the_wrapped_optimizer():
    a, b = tiny_llama(torch.float32), tiny_llama(torch.float32)
    opt_a, opt_b = master_weights(adamw(a.parameters())), adamw(b.parameters())
    for step in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            backward(model, step)
            opt.step()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert opt_a.extra_bytes() == 0


def test_looks_like_the_optimizer_it_wraps_to_schedulers_and_clipping():
    model = tiny_llama(torch.bfloat16)
    inner = adamw(model.parameters(), 1e-3)
    opt = master_weights(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)
    backward(model, 0)
    torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.625)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert opt.extra_bytes() == 2 * sum(p.numel() for p in model.parameters())
    state = next(iter(opt.state.values()))
    assert state["exp_avg"].dtype == torch.float32  # moments in fp32, as with a separate master


def test_state_the_optimizer_had_before_wrapping_is_kept_in_fp32():
    a, b = tiny_llama(torch.bfloat16), tiny_llama(torch.bfloat16)
    inner_a = adamw(a.parameters())
    backward(a, 0)
    inner_a.step()
    opt = master_weights(inner_a)
    backward(a, 1)
    opt.step()
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    assert len(opt.state) == len(list(b.parameters()))


def test_misuse_is_refused_with_the_cause():
    model = tiny_llama(torch.bfloat16)
    inner = adamw(model.parameters())
    with pytest.raises(PrecisionError, match="unknown master_weights mode 'bf32'"):
        master_weights(inner, "bf32")
    with pytest.raises(PrecisionError, match=r"wraps a torch\.optim\.Optimizer"):
        master_weights(model.parameters())
    with pytest.raises(PrecisionError, match="LBFGS"):
        master_weights(torch.optim.LBFGS(model.parameters()))
    with pytest.raises(PrecisionError, match="chunk_bytes"):
        master_weights(inner, chunk_bytes=0)
    opt = master_weights(inner)
    with pytest.raises(PrecisionError, match="already wrapped"):
        master_weights(inner)
    backward(model, 0)
    with pytest.raises(PrecisionError, match="call step\\(\\) on the wrapper"):
        inner.step()
    with pytest.raises(PrecisionError, match="pickled"):
        copy.deepcopy(opt)


def test_a_state_dict_of_another_mode_or_model_is_refused_and_changes_nothing():
    model = tiny_llama(torch.bfloat16)
    opt = master_weights(adamw(model.parameters()), "remainder")
    backward(model, 0)
    opt.step()
    good = opt.state_dict()
    other = master_weights(adamw(tiny_llama(torch.bfloat16).parameters()), "fp32")
    with pytest.raises(PrecisionError, match=r"mode='remainder'.*mode='fp32'"):
        other.load_state_dict(good)
    before = [s.remainder.clone() for s in opt.slots()]
    bad = copy.deepcopy(good)
    bad["ipcbridge_master_weights"]["slots"][len(before) - 1]["remainder"] = torch.zeros(3, dtype=torch.int16)
    bad["ipcbridge_master_weights"]["slots"][0]["remainder"] = torch.ones_like(before[0])
    with pytest.raises(PrecisionError, match=f"slot {len(before) - 1}'s remainder must be int16 of shape"):
        opt.load_state_dict(bad)
    assert all(torch.equal(a, s.remainder) for a, s in zip(before, opt.slots(), strict=True))
    bad = copy.deepcopy(good)
    bad["ipcbridge_master_weights"]["slots"][0]["exception_index"] = torch.tensor([10**9])
    bad["ipcbridge_master_weights"]["slots"][0]["exception_value"] = torch.tensor([1.0])
    with pytest.raises(PrecisionError, match="exception indices must lie in"):
        opt.load_state_dict(bad)


def test_a_state_dict_the_wrapped_optimizer_refuses_leaves_the_masters_as_they_were():
    model = tiny_llama(torch.bfloat16)
    opt = master_weights(adamw(model.parameters()))
    backward(model, 0)
    opt.step()
    before = [s.remainder.clone() for s in opt.slots()]
    bad = opt.state_dict()
    bad["ipcbridge_master_weights"]["slots"][0]["remainder"] = torch.ones_like(before[0])
    bad["param_groups"] = bad["param_groups"] * 2  # torch refuses: two groups for one
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict(bad)
    assert all(torch.equal(a, s.remainder) for a, s in zip(before, opt.slots(), strict=True))


def test_a_plain_optimizer_state_dict_restarts_the_masters_from_the_served_weights():
    model = tiny_llama(torch.bfloat16)
    opt = master_weights(adamw(model.parameters(), 1e-6))
    backward(model, 0)
    opt.step()
    assert any(s.remainder.ne(0).any() for s in opt.slots())
    plain = adamw(tiny_llama(torch.bfloat16).parameters(), 1e-6).state_dict()
    opt.load_state_dict(plain)
    assert all(s.remainder.eq(0).all() and len(s.exceptions) == 0 for s in opt.slots())
