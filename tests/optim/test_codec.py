"""The remainder identity (Note [the remainder identity]) on hand-picked and random bit patterns."""

from __future__ import annotations

import pytest
import torch

from ipcbridge.optim.codec import Exceptions, encode_remainder, join_master, stochastic_round_


def _from_bits(bits: list[int]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def _edge_masters() -> torch.Tensor:
    ties = [(h << 16) | 0x8000 for h in (0x3F80, 0x3F81, 0xBF80, 0xBF81)]  # even/odd high halves, both signs
    near = [(0x3F80 << 16) | 0x7FFF, (0x3F80 << 16) | 0x8001, (0xBF81 << 16) | 0x7FFF]
    special = [0, 1 << 31, 1, (1 << 31) | 1, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0x00800000, 0x007FFFFF]
    bits = [b - (1 << 32) if b >= 1 << 31 else b for b in ties + near + special]
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(n, generator=g) * s for n, s in ((4096, 0.02), (4096, 1e-6), (64, 1e5))]
    return torch.cat([_from_bits(bits), *noise])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact_and_served_weight_is_round_to_nearest_even(dtype):
    master = _edge_masters()
    served = torch.empty_like(master, dtype=dtype)
    remainder = torch.empty_like(master, dtype=torch.int16)
    exceptions = encode_remainder(served, master, remainder)
    assert torch.equal(served.view(torch.int16), master.to(dtype).view(torch.int16))
    back = join_master(served, remainder, exceptions)
    assert torch.equal(back.view(torch.int32), master.view(torch.int32))


def test_bf16_exceptions_are_exactly_the_ties_rounded_down():
    master = _edge_masters()
    served = torch.empty_like(master, dtype=torch.bfloat16)
    exceptions = encode_remainder(served, master, torch.empty_like(master, dtype=torch.int16))
    low = master.view(torch.int32) & 0xFFFF
    rounded_down = (served.float().view(torch.int32) >> 16) == (master.view(torch.int32) >> 16)
    expected = ((low == 0x8000) & rounded_down).nonzero().view(-1)
    assert torch.equal(exceptions.index, expected)
    assert {0, 2} <= set(exceptions.index.tolist())  # the hand-made ties with an even high half


def test_fp16_masters_below_the_normal_range_are_exceptions():
    master = torch.tensor([1e-6, -3e-7, 0.5, 1e6])
    served = torch.empty_like(master, dtype=torch.float16)
    exceptions = encode_remainder(served, master, torch.empty_like(master, dtype=torch.int16))
    assert exceptions.index.tolist() == [0, 1, 3]


def test_exceptions_validate_their_own_shape():
    with pytest.raises(ValueError, match="1-D of one length"):
        Exceptions(torch.zeros(3, dtype=torch.int64), torch.zeros(2))
    with pytest.raises(ValueError, match="int64 indices and float32 values"):
        Exceptions(torch.zeros(3, dtype=torch.int32), torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour(dtype):
    base = torch.full((200_000,), 1.0)
    ulp = float(torch.nextafter(torch.ones(1, dtype=dtype), torch.full((1,), 2.0, dtype=dtype)).float() - 1)
    master = base + 0.3 * ulp  # plain rounding never moves it
    served = torch.empty_like(master, dtype=dtype)
    stochastic_round_(served, master, torch.Generator().manual_seed(0))
    values = set(served.float().unique().tolist())
    assert values == {1.0, 1.0 + ulp}
    assert abs(float(served.float().mean()) - float(master.mean())) < 0.01 * ulp
    exact = torch.tensor([0.5, -2.0, float("inf")])
    out = torch.empty_like(exact, dtype=dtype)
    stochastic_round_(out, exact, None)
    assert out.float().tolist() == exact.tolist()
