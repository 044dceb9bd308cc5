"""Forged manifests against the shm transport, written as a hostile peer would write them.

A real producer process exports weights and also holds what a forged manifest would like the trainer to
map instead: its log (a file on disk), a named file in /dev/shm, a pipe. The forger reads inode and size
from /proc like anyone of the same user can, so the manifest's own word always "matches". Every forgery
must be refused with ``BridgeError`` before anything is mapped, and leave the target untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ipcbridge
from ipcbridge import BridgeError
from ipcbridge.handles import open_manifest
from ipcbridge.manifest import Manifest, Producer, TensorSpec
from ipcbridge.transports import shm

ROOT = str(Path(__file__).resolve().parents[2])

PRODUCER = textwrap.dedent(
    """
    import json, os, sys, torch, ipcbridge
    w = torch.zeros(16)
    m = ipcbridge.export({"w": w})
    log = open(sys.argv[1], "w+b")
    log.write(b"engine log line\\n" * 4)
    log.flush()
    named = open(sys.argv[2], "w+b")
    named.write(b"\\0" * 64)
    named.flush()
    r, _w = os.pipe()
    print(json.dumps({"manifest": m.to_dict(), "log": log.fileno(), "named": named.fileno(), "pipe": r}), flush=True)
    sys.stdin.read()  # until the test is done
    """
)


@pytest.fixture(scope="module")
def producer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("producer")
    named = Path(f"/dev/shm/ipcbridge-test-{os.getpid()}-named")
    proc = subprocess.Popen([sys.executable, "-c", PRODUCER, str(tmp / "engine.log"), str(named)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        info["manifest"] = Manifest.from_dict(info["manifest"])
        info["pid"], info["log_path"] = proc.pid, tmp / "engine.log"
        yield info
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(30)
        named.unlink(missing_ok=True)


def forge(base: Manifest, pid: int, fd: int, producer: int | None = None, nbytes: int = 64) -> Manifest:
    """``base`` with one storage pointing at process ``pid``'s ``fd``; inode and size read from /proc."""
    st = os.stat(f"/proc/{pid}/fd/{fd}")
    nbytes = min(nbytes, st.st_size)
    spec = shm.Spec(pid=pid, fd=fd, inode=st.st_ino, nbytes=nbytes)
    tensor = TensorSpec(name="w", storage=0, dtype="uint8", shape=(nbytes,), stride=(1,), storage_offset=0,
                        nbytes=nbytes)
    p = base.producer if producer is None else dataclasses.replace(base.producer, pid=producer, start_time=0)
    return base.replace(storages=(spec,), tensors=(tensor,), producer=p)


def mapped(fragment: str) -> int:
    """How many mappings of this process name ``fragment``."""
    return sum(fragment in line for line in Path("/proc/self/maps").read_text().splitlines())


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def refused(m: Manifest, match: str) -> None:
    before_fds, before_maps = fds(), len(Path("/proc/self/maps").read_text().splitlines())
    with pytest.raises(BridgeError, match=match):
        open_manifest(m)
    assert fds() == before_fds
    assert len(Path("/proc/self/maps").read_text().splitlines()) == before_maps


def test_the_producers_log_on_disk_is_refused_and_untouched(producer) -> None:
    before = producer["log_path"].read_bytes()
    refused(forge(producer["manifest"], producer["pid"], producer["log"]), "not on a tmpfs")
    assert producer["log_path"].read_bytes() == before
    assert mapped(str(producer["log_path"])) == 0


def test_a_named_file_in_dev_shm_is_refused(producer) -> None:
    refused(forge(producer["manifest"], producer["pid"], producer["named"]),
            "not an unlinked shared-memory object that torch made in process")


def test_a_pipe_is_refused_before_it_is_opened(producer) -> None:
    refused(forge(producer["manifest"], producer["pid"], producer["pipe"]), "it is not a file")


def test_the_trainers_own_open_file_is_refused(producer, tmp_path: Path) -> None:
    secret = tmp_path / "trainer-secret.txt"
    secret.write_bytes(b"s" * 64)
    with open(secret, "r+b") as f:
        refused(forge(producer["manifest"], os.getpid(), f.fileno()), f"names process {os.getpid()}, but the "
                f"manifest's producer is process {producer['pid']}")
    assert secret.read_bytes() == b"s" * 64


def test_another_engines_weights_are_refused(producer) -> None:
    other = torch.ones(16)  # this process's own torch shared memory: "another engine" to the producer's manifest
    spec = ipcbridge.export({"w": other}).storages[0]
    refused(forge(producer["manifest"], os.getpid(), spec.fd), "may only map its producer's own memory")


def test_another_process_file_is_refused_even_as_its_producer(tmp_path: Path) -> None:
    secret = tmp_path / "other-process.txt"
    secret.write_bytes(b"o" * 64)
    with open(secret, "rb") as f:
        other = subprocess.Popen(["sleep", "60"], stdin=f)
    try:
        base = ipcbridge.export({"w": torch.zeros(4)})
        refused(forge(base, other.pid, 0, producer=other.pid), "not on a tmpfs")
    finally:
        other.kill()
        other.wait()
    assert secret.read_bytes() == b"o" * 64


def test_a_dead_producer_is_refused(producer) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    m = producer["manifest"]
    gone = m.replace(producer=dataclasses.replace(m.producer, pid=dead.pid, start_time=0))
    refused(gone, f"process {dead.pid}, is not running")
    # ...also when its storages name a live process (here: this one, which the forger can read)
    weights = torch.zeros(16)
    live = ipcbridge.export({"w": weights})
    refused(forge(live, os.getpid(), live.storages[0].fd, producer=dead.pid), "is not running")


def test_a_reused_pid_is_refused(producer) -> None:
    m = producer["manifest"]
    other = m.replace(producer=dataclasses.replace(m.producer, start_time=m.producer.start_time + 1))
    refused(other, "its pid was reused")


def test_an_empty_boot_id_does_not_switch_the_check_off(producer) -> None:
    m = producer["manifest"]
    refused(m.replace(producer=dataclasses.replace(m.producer, boot_id="")), "another machine or boot")


def test_a_later_bad_storage_leaves_the_good_one_unmapped(producer) -> None:
    m = producer["manifest"]
    opened = open_manifest(m)  # the genuine manifest maps...
    assert opened.tensors["w"].eq(0).all() and mapped(f"/dev/shm/torch_{producer['pid']}_") >= 1
    opened.close()
    del opened
    bad = forge(m, producer["pid"], producer["log"])
    both = m.replace(
        storages=(m.storages[0], bad.storages[0]),
        tensors=(m.tensors[0], dataclasses.replace(bad.tensors[0], name="x", storage=1)),
    )
    before = mapped(f"/dev/shm/torch_{producer['pid']}_")
    refused(both, r"manifest\.storages\[1\]|not on a tmpfs")
    assert mapped(f"/dev/shm/torch_{producer['pid']}_") == before


def test_producer_is_read_from_proc() -> None:
    p = Producer.current()
    assert p.pid == os.getpid() and p.start_time > 0
