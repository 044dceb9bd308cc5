"""The demo's progress, summary, JSON and plot; the library logs through ``log`` and never prints."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from ipcbridge import cli, demo
from ipcbridge.errors import EngineError


def test_progress_goes_to_log_not_stdout(capsys) -> None:
    lines: list[str] = []

    def log(text: str, *, end: str = "\n") -> None:
        lines.append(text + end)

    s = demo.run(steps=2, batch=4, device="cpu", log=log)
    assert capsys.readouterr().out == ""  # the library never prints
    text = "".join(lines)
    # each start-up phase is announced before it starts and timed when done, on one line
    assert lines[0].startswith("starting the local engine (cpu, bfloat16)... ") and lines[0].endswith(" ")
    assert lines[1].endswith(" s\n")
    assert "attaching the trainer" in text and "step  reward version" in text
    assert [p.step for p in s.per_step] == [0, 1] and [p.weight_version for p in s.per_step] == [0, 1]
    assert s.engine_start_seconds > 0 and s.seconds >= s.engine_start_seconds
    d = demo.summary_dict(s)
    assert json.loads(json.dumps(d))["per_step"][1] == {"step": 1, "reward": s.per_step[1].reward,
                                                        "weight_version": 1}


def test_quiet_prints_only_the_summary(capsys) -> None:
    assert cli.main(["demo", "--steps", "2", "--batch", "4", "--device", "cpu", "-q"]) == 0
    out, err = capsys.readouterr()
    assert "starting" not in out + err and "step  reward" not in out
    lines = out.strip().splitlines()
    assert lines[0].startswith("summary: 2 steps in ")
    assert lines[1].startswith("reward, step 0 ") and lines[2].startswith("reward, step 1 ")
    assert lines[3].startswith("reward, mean of last 2 ")  # two steps: the window says 2, not 3


def test_demo_rejects_empty_runs() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        demo.run(steps=0)


def test_run_errors_are_one_line(monkeypatch, capsys) -> None:
    def boom(**kwargs):
        raise EngineError("engine process exited with code 1 while starting:\nchild traceback ...")

    monkeypatch.setattr(demo, "run", boom)
    assert cli.main(["demo", "-q"]) == 2
    err = capsys.readouterr().err
    assert err == ("ipcbridge: error: EngineError: engine process exited with code 1 while starting: "
                   "(run with -v for details)\n")
    assert cli.main(["demo", "-q", "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "child traceback" in err


def test_plot_without_matplotlib(monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    s = demo.Summary(0.0, 1.0, 1, "shm", "local", "cpu", "bfloat16", "remainder", 0.0, 0.0, 0, 1, None, 0.0,
                     per_step=[demo.Step(0, 0.5, 0)])
    with pytest.raises(ImportError, match=r'pip install "ipcbridge\[plot\]"'):
        demo.plot(s, str(tmp_path / "curve.png"))


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib (ipcbridge[plot])")
def test_plot_writes_png(tmp_path, capsys) -> None:
    path = tmp_path / "curve.png"
    assert cli.main(["demo", "--steps", "2", "--batch", "4", "--device", "cpu", "--json", "--plot", str(path)]) == 0
    out = capsys.readouterr().out
    assert len(json.loads(out)["per_step"]) == 2
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
