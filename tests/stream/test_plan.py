"""The stream plan: bucketing, alignment, pack/unpack, and validation of a plan that crossed a process."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from ipcbridge import ManifestError, transports
from ipcbridge.stream.plan import ALIGNMENT, StreamPlan, pack, plan_buckets, unpack
from tests.helpers import mixed_tensors

MIXED = mixed_tensors()


def round_trip(tensors: dict[str, torch.Tensor], plan: StreamPlan) -> dict[str, torch.Tensor]:
    buf = torch.empty(plan.buffer_bytes, dtype=torch.uint8)
    out = {}
    for b in plan.buckets:
        pack(tensors, b, buf)
        out.update({n: v.clone() for n, v in unpack(buf, b).items()})
    return out


def test_mixed_dtypes_and_odd_sizes_round_trip_aligned() -> None:
    plan = plan_buckets(MIXED, bucket_bytes=512)
    assert [s.name for s in plan.slots] == list(MIXED)  # order kept, every tensor exactly once
    assert len(plan.buckets) > 1
    for b in plan.buckets:
        assert b.slots[0].offset == 0
        assert all(s.offset % ALIGNMENT == 0 for s in b.slots)
        assert len(b.slots) == 1 or b.nbytes <= 512
    out = round_trip(MIXED, plan)
    for name, t in MIXED.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t), name


def test_plan_from_specs_equals_plan_from_tensors() -> None:
    specs = [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in MIXED.items()]
    assert plan_buckets(specs, 512) == plan_buckets(MIXED, 512)


def test_oversize_tensor_gets_a_bucket_of_its_own() -> None:
    tensors = {"a": torch.ones(10), "big": torch.randn(1000), "b": torch.ones(3), "c": torch.ones(2)}
    plan = plan_buckets(tensors, bucket_bytes=300)
    assert [b.names for b in plan.buckets] == [["a"], ["big"], ["b", "c"]]
    assert plan.buckets[1].nbytes == 4000 and plan.buffer_bytes == 4000
    assert plan.wire_bytes == 40 + 4000 + 256 + 8
    assert torch.equal(round_trip(tensors, plan)["big"], tensors["big"])


def test_the_default_bucket_size_follows_the_model() -> None:
    # Note [bucket policy]: total / 16, at least 256 MiB, at most the largest tensor (which sizes the buffers).
    mib = 1 << 20
    embed = ("embed", "bfloat16", (600 * mib // 2,))  # 600 MiB
    layers = [(f"l{i}", "bfloat16", (96 * mib // 2,)) for i in range(84)]  # 84 x 96 MiB
    plan = plan_buckets([embed, *layers])  # 8664 MiB in all: 16ths of 541 MiB, 5 layers each
    assert plan.bucket_bytes == (600 + 84 * 96) * mib // 16 and plan.buffer_bytes == 600 * mib
    assert [len(b.slots) for b in plan.buckets] == [1] + [5] * 16 + [4]
    more = [(f"m{i}", "bfloat16", (96 * mib // 2,)) for i in range(400)]
    huge = plan_buckets([embed, *more])  # 16ths above the largest tensor: capped at it
    assert huge.bucket_bytes == huge.buffer_bytes == 600 * mib
    asked = plan_buckets([embed, *layers], 256 * mib)  # asked for: kept, same buffers, more broadcasts
    assert len(asked.buckets) == 43 and asked.buffer_bytes == 600 * mib
    small = plan_buckets([("w", "float32", (1000,))])  # a small model: 256 MiB
    assert small.bucket_bytes == 256 * mib and small.buffer_bytes == 4000


def test_unpack_views_alias_the_buffer_and_go_stale_on_reuse() -> None:
    tensors = {"x": torch.ones(64), "y": torch.full((64,), 2.0)}
    plan = plan_buckets(tensors, bucket_bytes=256)  # one tensor per bucket
    buf = torch.empty(plan.buffer_bytes, dtype=torch.uint8)
    pack(tensors, plan.buckets[0], buf)
    x = unpack(buf, plan.buckets[0])["x"]
    assert x.data_ptr() == buf.data_ptr() and torch.equal(x, tensors["x"])
    pack(tensors, plan.buckets[1], buf)
    assert torch.equal(x, tensors["y"])  # the view now shows whatever the buffer holds


def test_pack_refuses_tensors_that_do_not_fit_the_plan() -> None:
    plan = plan_buckets({"w": torch.zeros(2, 3)}, 1024)
    buf = torch.empty(plan.buffer_bytes, dtype=torch.uint8)
    with pytest.raises(ManifestError, match=r"'w'.*plan has float32 \[2, 3\]"):
        pack({"w": torch.zeros(3, 2)}, plan.buckets[0], buf)
    with pytest.raises(ManifestError, match="plan has float32"):
        pack({"w": torch.zeros(2, 3, dtype=torch.float64)}, plan.buckets[0], buf)
    with pytest.raises(ManifestError, match="'w' of the stream plan is missing"):
        pack({}, plan.buckets[0], buf)
    with pytest.raises(ManifestError, match="cannot hold"):
        pack({"w": torch.zeros(2, 3)}, plan.buckets[0], torch.empty(8, dtype=torch.uint8))
    with pytest.raises(ManifestError, match="1-d uint8"):
        unpack(torch.empty(plan.buffer_bytes, dtype=torch.float32), plan.buckets[0])


def test_plan_json_round_trip() -> None:
    plan = plan_buckets(MIXED, 512)
    assert StreamPlan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json())["format"] == "ipcbridge.stream_plan"


def _mutate(path: list[Any], value: Any):
    def apply(d: dict[str, Any]) -> None:
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return apply


@pytest.mark.parametrize(("change", "message"), [
    (_mutate(["buckets", 0, 1, "offset"], 100), "not a multiple of the alignment"),
    (_mutate(["buckets", 0, 1, "offset"], 0), "overlaps"),
    (_mutate(["buckets", 0, 1, "name"], "a"), "appears twice"),
    (_mutate(["buckets", 0, 0, "dtype"], "float128"), "unknown dtype"),
    (_mutate(["buckets", 0, 0, "nbytes"], 12), "nbytes: 12 != numel x itemsize = 16"),
    (_mutate(["buckets", 0, 0, "shape"], [True]), "expected int, got bool"),
    (_mutate(["buckets", 0, 0, "shape"], [-1]), "must be >= 0"),
    (_mutate(["bucket_bytes"], 200), "only a bucket of one tensor may be larger"),
    (_mutate(["alignment"], 96), "power of two"),
    (_mutate(["buckets", 1], []), "at least one tensor"),
    (_mutate(["format_version"], 2), "format_version: 2 is not supported"),
    (_mutate(["format"], "ipcbridge.manifest"), "expected 'ipcbridge.stream_plan'"),
    (_mutate(["extra"], 1), r"unknown field\(s\) \['extra'\]"),
    (_mutate(["buckets", 0, 0, "extra"], 1), r"buckets\[0\]\[0\]: unknown field"),
    (_mutate(["buckets"], {}), "expected list"),
])
def test_plan_validation_errors(change, message) -> None:
    plan = plan_buckets({"a": torch.zeros(4), "b": torch.zeros(4), "c": torch.zeros(100)}, 512)
    d = json.loads(plan.to_json())
    change(d)
    with pytest.raises(ManifestError, match=message):
        StreamPlan.from_dict(d)


def test_plan_json_must_be_json() -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        StreamPlan.from_json("{nope")


def test_plan_buckets_refuses_bad_input() -> None:
    with pytest.raises(ManifestError, match="bucket_bytes: must be >= 1"):
        plan_buckets({"a": torch.zeros(1)}, 0)
    with pytest.raises(ManifestError, match="cannot be exported"):
        plan_buckets({"a": torch.zeros(1, dtype=torch.complex64)}, 64)


def test_a_manifest_cannot_name_the_stream() -> None:
    with pytest.raises(ManifestError, match="unknown transport 'nccl'"):
        transports.get("nccl")  # streaming is no sharing transport: a manifest can never name it


def test_packing_parameters_that_require_grad_leaves_the_buffer_out_of_autograd() -> None:
    params = {"a": torch.nn.Parameter(torch.randn(10)), "b": torch.nn.Parameter(torch.randn(3, 3))}
    plan = plan_buckets(params, 1 << 20)
    buffer = torch.empty(plan.buffer_bytes, dtype=torch.uint8)
    pack(params, plan.buckets[0], buffer)
    views = unpack(buffer, plan.buckets[0])
    assert not buffer.requires_grad and not any(v.requires_grad for v in views.values())
    assert all(torch.equal(views[n], p.detach()) for n, p in params.items())
