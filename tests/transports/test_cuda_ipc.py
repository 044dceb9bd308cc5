"""CUDA IPC spec: pure parts and the provenance checks on CPU (with forged handles and a fake ref-counter
file); real handles between two processes are tested on the GPU machine (tests/gpu)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from ipcbridge import BridgeError, ManifestError
from ipcbridge.transports import cuda_ipc

UUID = "GPU-0a1b2c3d-0000-1111-2222-333344445555"
_names = itertools.count()


def _spec(**kw) -> cuda_ipc.Spec:
    base = dict(gpu_uuid=UUID, device_index=3, handle=b"\x02c" + b"\x01" * 64, nbytes=1024, offset_bytes=512,
                ref_counter_handle=f"/torch_{os.getpid()}_12345_0".encode(), ref_counter_offset=8,
                event_handle=b"\x02" * 64, event_sync_required=True)
    base.update(kw)
    return cuda_ipc.Spec(**base)


@pytest.fixture
def ref_counter():
    """A file shaped like torch's ref-counter file of this process, in /dev/shm."""
    name = f"/torch_{os.getpid()}_999_{next(_names)}"
    path = Path("/dev/shm" + name)
    path.write_bytes(b"\0" * 8 * cuda_ipc.REF_COUNTER_SLOTS)
    yield name.encode(), path
    path.unlink(missing_ok=True)


def test_spec_json_round_trip() -> None:
    spec = _spec()
    assert cuda_ipc.Spec.from_dict(spec.to_dict(), "s") == spec
    none_event = _spec(event_handle=None)
    assert cuda_ipc.Spec.from_dict(none_event.to_dict(), "s") == none_event


def test_local_device_goes_in_the_device_position() -> None:
    args = cuda_ipc._new_shared_cuda_args(_spec(), local_index=0)
    assert args[0] == 0  # never the producer's device_index 3
    assert args[1:4] == (b"\x02c" + b"\x01" * 64, 1024, 512)


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


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        # an expandable segment's handle names a pid and fds torch would pull out of that process
        ("handle", b"\x02e" + b"\0" * 80, r"cuda_ipc\.handle: an expandable segment"),
        ("handle", b"\x01" * 64, r"cuda_ipc\.handle: 64 bytes of type '\\x01', expected torch's legacy"),
        ("handle", b"", r"cuda_ipc\.handle: 0 bytes"),
        # torch opens /dev/shm/<name> and writes into it: only its own names
        ("ref_counter_handle", b"/../../home/user/.bashrc", r"cuda_ipc\.ref_counter_handle: .* not a torch ref-counter"),
        ("ref_counter_handle", b"/torch_1_2", "not a torch ref-counter"),
        ("ref_counter_offset", cuda_ipc.REF_COUNTER_SLOTS, r"cuda_ipc\.ref_counter_offset: must be <= 9999"),
        ("event_handle", b"\0" * 10, r"cuda_ipc\.event_handle: 10 bytes, expected 64"),
        ("gpu_uuid", "gpu-abc", r"cuda_ipc\.gpu_uuid: 'gpu-abc' is not a GPU UUID"),
        ("gpu_uuid", "MIG-0a1b2c3d-0000-1111-2222-333344445555", "not a GPU UUID"),
    ],
)
def test_forged_handles_are_manifest_errors(field: str, value: object, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        _spec(**{field: value})


def test_a_ref_counter_of_another_process_is_refused(ref_counter) -> None:
    name, _ = ref_counter
    with pytest.raises(BridgeError, match=r"names process \d+, but the manifest's producer is process 1\b"):
        cuda_ipc.claim(_spec(ref_counter_handle=name), producer=1)


def test_a_missing_ref_counter_file_is_refused() -> None:
    with pytest.raises(BridgeError, match=r"ref-counter file .* cannot be opened"):
        cuda_ipc.claim(_spec(ref_counter_handle=f"/torch_{os.getpid()}_1_424242".encode()), producer=os.getpid())


def test_a_ref_counter_file_too_small_for_its_slots_is_refused(ref_counter) -> None:
    name, path = ref_counter
    path.write_bytes(b"\0" * 8)  # torch would write slot 8 past the end of the mapping
    with pytest.raises(BridgeError, match="is not a torch ref-counter file"):
        cuda_ipc.claim(_spec(ref_counter_handle=name), producer=os.getpid())


def test_a_genuine_looking_handle_passes_provenance_and_needs_the_gpu(ref_counter) -> None:
    name, _ = ref_counter
    # On CPU the last check is the GPU's: the provenance checks above it all passed.
    with pytest.raises(BridgeError, match=r"sees no CUDA device|is not visible to this process"):
        cuda_ipc.rebuild_storage(_spec(ref_counter_handle=name), producer=os.getpid())


def test_uuid_normalisation() -> None:
    assert cuda_ipc.normalize_uuid("GPU-1234-ABCD") == "1234-abcd"


_NO_GPU = r"sees no CUDA device|is not visible to this process"  # the last check: provenance passed


def test_a_ref_counter_file_is_checked_once_per_open(ref_counter, monkeypatch) -> None:
    """Note [one check per ref-counter file]: one stat per file and open, the per-storage checks every time."""
    name, path = ref_counter
    stats: list[str] = []
    real_stat = os.stat
    monkeypatch.setattr(cuda_ipc.os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
    checked: set[str] = set()
    for offset in (1, 2, 3):
        with pytest.raises(BridgeError, match=_NO_GPU):
            cuda_ipc.claim(_spec(ref_counter_handle=name, ref_counter_offset=offset), os.getpid(), checked=checked)
    assert [p for p in stats if str(p).startswith("/dev/shm/")] == [str(path)] and checked == {str(path)}
    # the storage's own facts are still checked with the file in the set: whose file it names
    with pytest.raises(BridgeError, match="but the manifest's producer is process 1"):
        cuda_ipc.claim(_spec(ref_counter_handle=name), producer=1, checked=checked)


def test_the_once_per_open_cache_never_outlives_the_open(ref_counter) -> None:
    name, path = ref_counter
    with pytest.raises(BridgeError, match=_NO_GPU):
        cuda_ipc.claim(_spec(ref_counter_handle=name), os.getpid(), checked=set())
    path.write_bytes(b"\0" * 8)  # the next open checks again and sees the file shrunk
    checked: set[str] = set()
    with pytest.raises(BridgeError, match="is not a torch ref-counter file"):
        cuda_ipc.claim(_spec(ref_counter_handle=name), os.getpid(), checked=checked)
    assert checked == set()  # a refused file is never remembered as checked
    with pytest.raises(BridgeError, match="is not a torch ref-counter file"):
        cuda_ipc.claim(_spec(ref_counter_handle=name), os.getpid())  # no set: checked every time


_PRODUCER = """
import sys, torch, ipcbridge
ts = {f"small{i}": torch.zeros(1000 + i, device="cuda") for i in range(12)}  # storages of one segment
ts["big"] = torch.zeros(4 << 20, device="cuda")  # a segment of its own
torch.cuda.synchronize()
print(ipcbridge.export(ts).to_json(), flush=True)
sys.stdin.readline()  # the consumer wrote, synchronised and unmapped
print(int(bool(ts["small3"].eq(7).all()) and bool(ts["big"].eq(7).all()) and bool(ts["small4"].eq(0).all())),
      flush=True)
"""


@pytest.mark.gpu
def test_many_cuda_storages_check_their_ref_counter_file_once_and_alias(monkeypatch) -> None:
    import subprocess
    import sys

    import torch

    from ipcbridge.handles import open_manifest
    from ipcbridge.manifest import Manifest

    root = str(Path(__file__).resolve().parents[2])
    child = subprocess.Popen([sys.executable, "-c", _PRODUCER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": root})
    try:
        line = child.stdout.readline()
        assert line, "the producer died before exporting (its stderr is above)"
        manifest = Manifest.from_json(line)
        files = {"/dev/shm" + s.ref_counter_handle.decode() for s in manifest.storages}
        torch.cuda.init()
        cuda_ipc._uuid_to_index()  # CUDA's own start-up is not what is counted
        stats: list[str] = []
        real_stat = os.stat
        monkeypatch.setattr(cuda_ipc.os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
        opened = open_manifest(manifest)
        monkeypatch.undo()
        ref_stats = sorted(p for p in stats if str(p).startswith("/dev/shm/"))
        assert ref_stats == sorted(files) and len(files) < len(manifest.storages)  # once per file, per open
        opened.tensors["small3"].fill_(7)
        opened.tensors["big"].fill_(7)
        torch.cuda.synchronize()
        opened.close()
        child.stdin.write("written\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "1"  # the producer sees the writes, and only those
    finally:
        child.stdin.close()
        child.wait(timeout=60)
