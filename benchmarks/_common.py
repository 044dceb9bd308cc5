"""What several benchmark scripts share: the Llama-3-8B shape, and one-process-per-case runs.

Not a benchmark. The scripts import it as ``_common``: they run as ``python benchmarks/NAME.py``, which puts
this folder first on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any


def llama_8b_config(tiny: bool = False) -> Any:
    """Llama-3.1-8B's shapes (8.03 B parameters, 16.06 GB in bf16), or a tiny Llama for a smoke test."""
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False)


def run_child(script: str, spec: str, out_dir: str, timeout: float, *, cwd: str, tail_chars: int = 800,
              **failed: Any) -> dict[str, Any]:
    """Run ``script --one spec --json F`` in a fresh process and return the row it wrote to F.

    A crash or a hang becomes the row's ``error`` (with the end of its log), plus ``failed``'s fields, so one
    case going wrong never takes the others down. The log stays in ``out_dir``.
    """
    safe = "".join(c if c.isalnum() else "_" for c in spec)
    path, log = os.path.join(out_dir, f"{safe}.json"), os.path.join(out_dir, f"{safe}.log")
    t0 = time.perf_counter()
    rc: int | str
    try:
        with open(log, "w") as f:
            rc = run_group([sys.executable, os.path.abspath(script), "--one", spec, "--json", path],
                           timeout, stdout=f, stderr=subprocess.STDOUT, cwd=cwd).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if os.path.exists(path):
        with open(path) as f:
            row = json.load(f)
    else:
        with open(log) as f:
            tail = f.read()[-tail_chars:]
        row = {"arch": spec, **failed, "error": f"process ended ({rc}) without a result: ...{tail}"}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def run_group(cmd: list[str], timeout: float, **popen: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, timeout=timeout, **popen)``, but the child leads a session of its own and a
    timeout kills that whole session: vLLM's EngineCore (and its workers) are the child's children, and
    ``subprocess.run`` kills only the child, leaving them alive, holding the GPU, for every later case."""
    with subprocess.Popen(cmd, start_new_session=True, **popen) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:  # the timeout, or KeyboardInterrupt: no engine left behind
            _kill_group(proc)
            raise
        finally:
            _kill_group(proc, signal.SIGTERM, quiet=True)  # the child is done: end what it left running
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, quiet: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    if not quiet:
        proc.wait()


def one(measure: Callable[[str], dict[str, Any]], spec: str, path: str, *, error_chars: int,
        **failed: Any) -> dict[str, Any]:
    """The ``--one`` worker: ``measure(spec)``'s row, or its exception as the row's ``error``, written to ``path``."""
    try:
        row = measure(spec)
    except Exception as e:  # reported in this case's row; the traceback goes to the log
        traceback.print_exc()
        row = {"arch": spec, **failed, "error": f"{type(e).__name__}: {e}"[:error_chars]}
    with open(path, "w") as f:
        json.dump(row, f, indent=1, default=str)
    return row
