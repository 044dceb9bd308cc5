"""CUDA IPC spec: pure parts on CPU; real handles between two processes on the GPU machine."""

from __future__ import annotations

import pytest

from ipcbridge import ManifestError
from ipcbridge.transports import cuda_ipc


def _spec(**kw) -> cuda_ipc.Spec:
    base = dict(gpu_uuid="gpu-abc", device_index=3, handle=b"\x01" * 64, nbytes=1024, offset_bytes=512,
                ref_counter_handle=b"ref", ref_counter_offset=8, event_handle=b"\x02" * 64, event_sync_required=True)
    base.update(kw)
    return cuda_ipc.Spec(**base)


def test_spec_json_round_trip() -> None:
    spec = _spec()
    assert cuda_ipc.Spec.from_dict(spec.to_dict(), "s") == spec
    none_event = _spec(event_handle=None)
    assert cuda_ipc.Spec.from_dict(none_event.to_dict(), "s") == none_event


def test_local_device_goes_in_the_device_position() -> None:
    args = cuda_ipc._new_shared_cuda_args(_spec(), local_index=0)
    assert args[0] == 0  # never the producer's device_index 3
    assert args[1:4] == (b"\x01" * 64, 1024, 512)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("handle", "!!notbase64", "not valid base64"), ("nbytes", -1, "must be >= 0"),
     ("event_sync_required", 1, "expected bool")],
)
def test_bad_fields(field: str, value: object, message: str) -> None:
    d = _spec().to_dict()
    d[field] = value
    with pytest.raises(ManifestError, match=message):
        cuda_ipc.Spec.from_dict(d, "manifest.storages[0]")


def test_uuid_normalisation() -> None:
    assert cuda_ipc.normalize_uuid("GPU-1234-ABCD") == "1234-abcd"
