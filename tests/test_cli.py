"""`ipcbridge demo`: the reward rises and the trainer allocates no weight memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ipcbridge.cli import main

KEYS = {"reward_first", "reward_last", "steps", "transport", "attach_seconds", "fence_seconds_median",
        "trainer_weight_bytes", "model_weight_bytes"}


def test_demo_json_reward_rises() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ipcbridge", "demo", "--json", "--steps", "24", "--device", "cpu"],
        capture_output=True, text=True, timeout=240, check=True,
    )
    summary = json.loads(out.stdout)
    assert summary.keys() >= KEYS
    assert summary["reward_last"] > summary["reward_first"] + 0.3
    assert summary["trainer_weight_bytes"] == 0 and summary["model_weight_bytes"] > 0
    assert summary["transport"] == "shm" and summary["steps"] == 24


def test_usage_errors_exit_nonzero(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["demo", "--engine", "nope"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
