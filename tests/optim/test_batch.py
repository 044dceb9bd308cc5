"""The chunk-level dispatch (ipcbridge.optim.batch) over the fused kernels' host side, on CPU.

The kernels' device code runs only on a GPU (tests/gpu/test_master_weights_gpu.py). Here each kernel is
replaced by an eager stand-in that keeps its contract (flat buffers laid out by ``kernels.layout``,
exception slots with a capacity), so the host side (layouts, views, the exception scatter and the
overflow fallback) is tested on every CI run.
"""

from __future__ import annotations

import pytest
import torch

from ipcbridge.optim import batch, codec, kernels
from tests.optim.test_codec import _edge_masters


def _fake_join(served, remainders):
    flat, lay = kernels._new_flat(served)
    for o, s, r in zip(lay.host_offsets, served, remainders, strict=True):
        flat[o:o + s.numel()] = codec.join_master(s, r, codec.Exceptions.none("cpu")).view(-1)
    return flat


def _fake_upcast(tensors):
    flat, lay = kernels._new_flat(tensors)
    for o, t in zip(lay.host_offsets, tensors, strict=True):
        flat[o:o + t.numel()] = t.reshape(-1).float()
    return flat


def _fake_split(flat, served, remainders):
    lay = kernels.layout(tuple(s.numel() for s in served), flat.device)
    counts = torch.zeros(len(served), dtype=torch.int32)
    index, value = torch.empty(lay.exc_total, dtype=torch.int64), torch.empty(lay.exc_total)
    for t, (o, eo, s, r) in enumerate(zip(lay.host_offsets, lay.host_exc_offsets, served, remainders, strict=True)):
        m = flat[o:o + s.numel()].view(s.shape)
        s.copy_(m)
        r32, mask = codec.overflow(s, m)
        r.copy_(r32.masked_fill(mask, 0))
        found = mask.view(-1).nonzero().view(-1).flip(0)  # the kernel keeps them in no particular order
        counts[t] = found.numel()
        cap = kernels.exception_capacity(s.numel())
        keep, spill = found[:cap], found[cap:]
        if s.dtype == torch.bfloat16 and spill.numel():  # served rounded up; r = -2**15 holds the master
            s.view(-1).view(torch.int16)[spill] += 1
            r.view(-1)[spill] = -(1 << 15)
        index[eo:eo + keep.numel()] = keep
        value[eo:eo + keep.numel()] = m.reshape(-1)[keep]
    return counts, index, value, lay


def on_flat(masters: list[torch.Tensor]) -> batch.Masters:
    """``masters`` copied into one flat buffer laid out as the kernels lay out a chunk."""
    flat, lay = kernels._new_flat(masters)
    views = kernels.views(flat, lay, [m.shape for m in masters])
    for v, m in zip(views, masters, strict=True):
        v.copy_(m)
    return batch.Masters(views, flat)


@pytest.fixture
def fake_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "usable", lambda *ts: True)
    monkeypatch.setattr(kernels, "join", _fake_join)
    monkeypatch.setattr(kernels, "upcast", _fake_upcast)
    monkeypatch.setattr(kernels, "split", _fake_split)


def _chunk():
    g = torch.Generator().manual_seed(0)
    ties = torch.arange(0x1000, 0x1000 + 2 * 64 + 40, dtype=torch.int64).mul(1 << 16).add(0x8000)
    many_ties = ties.to(torch.int32).view(torch.float32)  # 84 tie-down exceptions: more than 64 + 0 slots
    shapes_and_masters = [
        _edge_masters()[:4096].view(64, 64), (torch.randn(24, generator=g) * 0.02), many_ties,
        (torch.randn(8, 40, generator=g)),
    ]
    return [m.contiguous() for m in shapes_and_masters]


def test_split_then_join_round_trips_a_chunk_through_the_kernel_path(fake_kernels):
    masters = _chunk()
    served = [torch.empty_like(m, dtype=torch.bfloat16) for m in masters]
    rems = [torch.empty_like(m, dtype=torch.int16) for m in masters]
    exceptions = batch.finish([batch.split(on_flat(masters), served, rems)])[0]
    cap = kernels.exception_capacity(masters[2].numel())
    assert len(exceptions[2]) == cap < 84  # 84 ties rounded down; 20 found no slot and were served rounded up
    for i, (s, r, e, m) in enumerate(zip(served, rems, exceptions, masters, strict=True)):
        ref_s, ref_r = torch.empty_like(s), torch.empty_like(r)
        ref_e = codec.encode_remainder(ref_s, m, ref_r)
        differ = (s.view(torch.int16) != ref_s.view(torch.int16)).sum()
        assert int(differ) == (84 - cap if i == 2 else 0)
        if i != 2:
            assert torch.equal(r, ref_r) and torch.equal(e.index.sort().values, ref_e.index)
    back = batch.join(served, rems, exceptions)
    assert back.flat is not None
    for b, m in zip(back.tensors, masters, strict=True):
        assert b.shape == m.shape and torch.equal(b.view(torch.int32), m.view(torch.int32))


def test_upcast_lays_tensors_out_in_one_flat_buffer(fake_kernels):
    tensors = [torch.randn(3, 8).to(torch.bfloat16), torch.randn(16).to(torch.bfloat16)]
    out = batch.upcast(tensors)
    assert out.flat is not None and all(o.untyped_storage().data_ptr() == out.flat.untyped_storage().data_ptr()
                                        for o in out.tensors)
    assert all(torch.equal(o, t.float()) for o, t in zip(out.tensors, tensors, strict=True))


def test_layout_offsets_keep_every_tensor_16_byte_aligned():
    lay = kernels.layout((5, 8, 4097, 3), torch.device("cpu"))
    assert lay.host_offsets == (0, 8, 16, 4116) and all(o % 4 == 0 for o in lay.host_offsets)
    assert lay.block_tensor.tolist() == [0, 1, 2, 2, 3]
    assert lay.block_start.tolist() == [0, 0, 0, 4096, 0]


def test_the_eager_path_runs_where_the_kernels_cannot():
    masters = _chunk()
    served = [torch.empty_like(m, dtype=torch.bfloat16) for m in masters]
    rems = [torch.empty_like(m, dtype=torch.int16) for m in masters]
    exceptions = batch.finish([batch.split(batch.Masters(masters), served, rems)])[0]
    back = batch.join(served, rems, exceptions)
    assert back.flat is None
    assert all(torch.equal(b.view(torch.int32), m.view(torch.int32)) for b, m in zip(back.tensors, masters, strict=True))


def test_fp16_exceptions_past_the_slots_are_gathered_from_the_masters(fake_kernels):
    masters = [torch.full((256,), 1e-7), torch.randn(64)]  # 256 exceptions (below fp16's normal range)
    served = [torch.empty_like(m, dtype=torch.float16) for m in masters]
    rems = [torch.empty_like(m, dtype=torch.int16) for m in masters]
    exceptions = batch.finish([batch.split(on_flat(masters), served, rems)])[0]
    assert len(exceptions[0]) == 256 > kernels.exception_capacity(256)
    back = batch.join(served, rems, exceptions)
    assert all(torch.equal(b.view(torch.int32), m.view(torch.int32)) for b, m in zip(back.tensors, masters, strict=True))
