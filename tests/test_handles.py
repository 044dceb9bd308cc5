"""export/open_manifest: another process maps the same bytes; each storage is opened once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ipcbridge
from ipcbridge import BridgeError
from ipcbridge.handles import open_manifest

ROOT = str(Path(__file__).resolve().parents[1])


def run_child(code: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_child_process_writes_are_seen_here(tmp_path: Path) -> None:
    fused = torch.zeros(6, 4)
    m = ipcbridge.export({"fused": fused, "rows": fused[2:4]})
    (tmp_path / "m.json").write_text(m.to_json())
    run_child(
        """
        import sys, torch, ipcbridge
        from ipcbridge.handles import open_manifest
        opened = open_manifest(ipcbridge.Manifest.from_json(open(sys.argv[1]).read()))
        assert len(opened.storages) == 1
        opened.tensors["rows"].fill_(7.0)
        """,
        str(tmp_path / "m.json"),
    )
    assert fused[2:4].eq(7).all() and fused[:2].eq(0).all() and fused[4:].eq(0).all()


def test_opening_own_export_returns_own_tensors() -> None:
    t = torch.randn(4, 4)
    m = ipcbridge.export({"t": t})
    opened = open_manifest(m)
    assert opened.tensors["t"].data_ptr() == t.data_ptr()
    opened.tensors["t"][0, 0] = 5.0
    assert t[0, 0].item() == 5.0


def test_own_export_whose_tensors_are_gone_says_what_to_do() -> None:
    m = ipcbridge.export({"t": torch.randn(4)})  # the tensor is dropped right away
    with pytest.raises(BridgeError, match="Pass the state dict itself"):
        open_manifest(m)


def test_manifest_from_another_boot_is_refused() -> None:
    m = ipcbridge.export({"t": torch.randn(4)})
    other = m.replace(producer=m.producer.__class__(pid=m.producer.pid, boot_id="not-this-boot", hostname="x"))
    with pytest.raises(BridgeError, match="another machine or boot"):
        open_manifest(other)
