"""Which engines can be aliased (``ipcbridge.vllm.policy``): facts read off a config, and every refusal
naming its cause and its way out."""

from __future__ import annotations

from typing import Any

import pytest

from ipcbridge.vllm.policy import (
    COPY_SYNC,
    STREAM,
    EngineFacts,
    _expandable_segments_on,
    refusal_reason,
    refusal_reasons,
)
from tests.vllm import vllm_fakes as F


def test_facts_from_vllm_config(config: Any) -> None:
    vc = F.fake_vllm_config(config, quantization="awq", tensor_parallel_size=2, enable_sleep_mode=True)
    f = EngineFacts.from_vllm_config(vc, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert f.quantization == "awq" and f.tensor_parallel_size == 2 and f.enable_sleep_mode
    assert f.model_type == "llama" and "expandable_segments:True" in f.alloc_conf
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineFacts(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="enable_sleep_mode"):
        EngineFacts(enable_sleep_mode="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight_devices"):
        EngineFacts(weight_devices=["cuda"])  # type: ignore[arg-type]


def test_facts_read_weight_devices_off_the_model(worker: F.FakeWorker) -> None:
    model = worker.model_runner.get_model()
    f = EngineFacts.from_vllm_config(worker.vllm_config, {}, model)
    assert f.weight_devices == ("cpu",) and f.alloc_conf == ","


def test_no_refusal_for_a_plain_engine() -> None:
    assert refusal_reason(EngineFacts(model_type="llama", weight_devices=("cuda",))) is None
    assert refusal_reason(EngineFacts(model_type="qwen3")) is None


@pytest.mark.parametrize(
    "facts, cause, way_out",
    [
        (EngineFacts(enable_sleep_mode=True), "cumem", "without enable_sleep_mode"),
        (EngineFacts(enable_cumem_allocator=True), "enable_cumem_allocator=True", "pause it instead"),
        (EngineFacts(alloc_conf="expandable_segments:True"), "expandable_segments:True", "expandable_segments:False"),
        (EngineFacts(alloc_conf="garbage_collection_threshold:0.6,expandable_segments:True,"), "expandable", "Unset"),
        (EngineFacts(tensor_parallel_size=2), "tensor_parallel_size=2", "tensor_parallel_size=1"),
        (EngineFacts(pipeline_parallel_size=2), "pipeline_parallel_size=2", "copy-based weight sync"),
        (EngineFacts(quantization="fp8"), "quantization='fp8'", "unquantized"),
        (EngineFacts(quantization="awq"), "awq", "copy-based weight sync"),
        (EngineFacts(model_type="mamba", derives_plans=False), "'mamba'", "llama"),
            (EngineFacts(moe_backends=("FLASHINFER_CUTLASS", "TRITON")), "FLASHINFER_CUTLASS", "moe_backend='triton'"),
        (EngineFacts(weight_devices=("cpu", "cuda")), "not on the GPU", "cpu_offload_gb=0"),
    ],
)
def test_refusals_name_cause_and_way_out(facts: EngineFacts, cause: str, way_out: str) -> None:
    msg = refusal_reason(facts)
    assert msg is not None and cause in msg and way_out in msg


def test_expandable_segments_last_setting_wins() -> None:
    assert refusal_reason(EngineFacts(alloc_conf="expandable_segments:True,expandable_segments:False")) is None
    assert refusal_reason(EngineFacts(alloc_conf="expandable_segments:False")) is None
    assert _expandable_segments_on(" expandable_segments : TRUE ")
    assert not _expandable_segments_on("")


def test_all_refusals_are_reported_together() -> None:
    reasons = refusal_reasons(EngineFacts(enable_sleep_mode=True, tensor_parallel_size=4, quantization="gptq"))
    assert len(reasons) == 3
    assert sum(COPY_SYNC in r for r in reasons) == 2  # sharding and quantization point at the copy-based way


def test_a_table_less_architecture_is_left_to_the_derived_plan() -> None:
    """The worker derives its plan from vLLM's loader and names the tensor if it cannot: no blanket refusal."""
    assert refusal_reason(EngineFacts(model_type="olmo2")) is None
    assert refusal_reason(EngineFacts(model_type="qwen3_moe", moe_backends=("TRITON",))) is None


def test_moe_backends_are_read_off_the_expert_layers() -> None:
    import enum

    from torch import nn

    from ipcbridge.vllm.policy import moe_backends

    class Backend(enum.Enum):
        TRITON = "TRITON"

    class Method:
        unquantized_backend = Backend.TRITON

    experts = nn.Linear(2, 2)
    experts.quant_method = Method()
    assert moe_backends(nn.Sequential(experts, nn.Linear(2, 2))) == ("TRITON",)
    assert moe_backends(nn.Linear(2, 2)) == ()
    with pytest.raises(ValueError, match="moe_backends"):
        EngineFacts(moe_backends=["TRITON"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "facts",
    [EngineFacts(enable_sleep_mode=True), EngineFacts(enable_cumem_allocator=True),
     EngineFacts(alloc_conf="expandable_segments:True"), EngineFacts(tensor_parallel_size=2),
     EngineFacts(pipeline_parallel_size=2)],
)
def test_refusals_of_memory_or_sharding_point_to_the_stream(facts: EngineFacts) -> None:
    msg = refusal_reason(facts)
    assert msg is not None and STREAM in msg and "ipcbridge.stream(engine, model)" in msg
    if facts.tensor_parallel_size > 1:
        assert "receiver='vllm'" in msg and "weight_transfer_config" in msg


def test_refusals_streaming_cannot_fix_do_not_point_to_it() -> None:
    for facts in (EngineFacts(quantization="awq"), EngineFacts(weight_devices=("cpu",)),
                  EngineFacts(moe_backends=("FLASHINFER_CUTLASS",))):
        msg = refusal_reason(facts)
        assert msg is not None and STREAM not in msg
