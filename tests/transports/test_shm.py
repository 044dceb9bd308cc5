"""The /dev/shm transport: moving storages in place, identity checks, a gone producer."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from ipcbridge import BridgeError, ManifestError
from ipcbridge.transports import shm


def test_reduce_moves_storage_in_place_and_views_follow() -> None:
    t = torch.arange(12.0)
    view = t[3:6]
    spec = shm.reduce_storage(t.untyped_storage())
    assert t.untyped_storage().is_shared()
    assert view.data_ptr() == t.data_ptr() + 3 * 4
    assert spec.pid == os.getpid() and spec.nbytes == 48
    rebuilt = shm.rebuild_storage(spec)  # a second mapping of the same pages, in this process
    mirror = torch.empty(0).set_(rebuilt, 0, (12,), (1,))
    mirror[4] = -1.0
    assert view[1].item() == -1.0


def test_inode_mismatch_is_refused() -> None:
    t = torch.zeros(4)
    spec = shm.reduce_storage(t.untyped_storage())
    with pytest.raises(BridgeError, match="no longer the exported memory"):
        shm.rebuild_storage(dataclasses.replace(spec, inode=spec.inode + 1))


def test_gone_producer_is_a_clear_error() -> None:
    proc = subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True)
    assert proc.returncode == 0
    dead_pid = 2**22 - 3  # far above any pid this machine hands out in a test run
    spec = shm.Spec(pid=dead_pid, fd=3, inode=1, nbytes=8)
    with pytest.raises(BridgeError, match="has exited or closed it"):
        shm.rebuild_storage(spec)


def test_spec_validation() -> None:
    with pytest.raises(ManifestError, match="unknown field"):
        shm.Spec.from_dict({"kind": "shm", "pid": 1, "fd": 1, "inode": 1, "nbytes": 1, "x": 1}, "s")
    with pytest.raises(ManifestError, match="fd: must be >= 0"):
        shm.Spec.from_dict({"kind": "shm", "pid": 1, "fd": -1, "inode": 1, "nbytes": 1}, "s")
