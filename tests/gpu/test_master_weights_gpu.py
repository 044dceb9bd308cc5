"""master_weights on CUDA: foreach and fused AdamW give classic mixed precision's weights, bit for bit."""

from __future__ import annotations

import pytest
import torch

from ipcbridge.optim import batch, kernels, master_weights
from ipcbridge.optim.codec import encode_remainder
from tests.optim.reference import ClassicMixedPrecision
from tests.optim.test_batch import on_flat
from tests.optim.test_codec import _edge_masters
from tests.optim.test_master import backward, bits, tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kernels_match_the_eager_codec_bit_for_bit(dtype):
    master = _edge_masters()
    ref = (torch.empty_like(master, dtype=dtype), torch.empty_like(master, dtype=torch.int16))
    exc_ref = encode_remainder(ref[0], master, ref[1])
    masters = on_flat([master.cuda()])
    served, rem = torch.empty_like(masters.tensors[0], dtype=dtype), torch.empty_like(masters.tensors[0], dtype=torch.int16)
    assert kernels.usable(served, rem)
    exc = batch.finish([batch.split(masters, [served], [rem])])[0][0]
    assert torch.equal(ref[0].view(torch.int16), served.cpu().view(torch.int16)) and torch.equal(ref[1], rem.cpu())
    order = exc.index.argsort()  # the kernel lists them in no order
    assert torch.equal(exc_ref.index, exc.index[order].cpu()) and torch.equal(exc_ref.value, exc.value[order].cpu())
    back = batch.join([served], [rem], [exc])
    assert back.flat is not None and torch.equal(back.tensors[0].cpu().view(torch.int32), master.view(torch.int32))
    grads = batch.upcast([served])
    assert grads.flat is not None and torch.equal(grads.tensors[0], served.float())


def test_ties_past_the_slots_are_served_rounded_up_and_the_master_stays_exact():
    ties = torch.arange(0x1000, 0x1000 + 20_000, dtype=torch.int64).mul(1 << 16).add(0x8000)
    master = ties.to(torch.int32).view(torch.float32)  # every element a tie; half of them round down
    masters = on_flat([master.cuda()])
    served = torch.empty_like(masters.tensors[0], dtype=torch.bfloat16)
    rem = torch.empty_like(masters.tensors[0], dtype=torch.int16)
    exc = batch.finish([batch.split(masters, [served], [rem])])[0][0]
    cap = kernels.exception_capacity(master.numel())
    assert len(exc) == cap
    assert int((served.cpu().view(torch.int16) != master.to(torch.bfloat16).view(torch.int16)).sum()) == 10_000 - cap
    back = batch.join([served], [rem], [exc])
    assert torch.equal(back.tensors[0].cpu().view(torch.int32), master.view(torch.int32))


def test_fused_stochastic_rounding_is_unbiased():
    ulp = 2.0**-7
    for sign in (1.0, -1.0):
        masters = on_flat([torch.full((1 << 20,), sign * (1.0 + 0.3 * ulp), device="cuda")])
        served = torch.empty_like(masters.tensors[0], dtype=torch.bfloat16)
        batch.stochastic_round(masters, [served], None, seed=1234)
        assert set(served.float().abs().unique().tolist()) == {1.0, 1.0 + ulp}
        assert abs(float(served.float().mean()) - float(masters.tensors[0].mean())) < 0.01 * ulp


@pytest.mark.parametrize("impl", [{"foreach": True}, {"fused": True}])
@pytest.mark.parametrize("mode", ["remainder", "fp32"])
def test_equals_classic_mixed_precision_on_cuda(impl, mode):
    ours, theirs = tiny_llama(torch.bfloat16).cuda(), tiny_llama(torch.bfloat16).cuda()
    opt = master_weights(torch.optim.AdamW(ours.parameters(), lr=1e-3, weight_decay=0.1, **impl), mode,
                         chunk_bytes=64 * 1024)
    ref = ClassicMixedPrecision(theirs, lambda masters: torch.optim.AdamW(masters, lr=1e-3, weight_decay=0.1, **impl))
    for step in range(20):
        backward(ours, step)
        backward(theirs, step)
        opt.step()
        ref.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(bits(a), bits(b))


def test_stochastic_mode_resumes_with_its_cuda_generator():
    runs = []
    for resume in (False, True):
        model = tiny_llama(torch.bfloat16).cuda()
        opt = master_weights(torch.optim.AdamW(model.parameters(), lr=1e-5), "stochastic", seed=1)
        for step in range(6):
            if resume and step == 3:
                saved = opt.state_dict()
                opt = master_weights(torch.optim.AdamW(model.parameters(), lr=1e-5), "stochastic", seed=99)
                opt.load_state_dict(saved)
            backward(model, step)
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
