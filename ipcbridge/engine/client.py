"""``LocalEngine``: start the embedded engine process and talk to it."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ipcbridge.engine import protocol
from ipcbridge.engine.inputs import Limits, Sampling, engine_device, engine_dtype
from ipcbridge.engine.types import GenerateOutput
from ipcbridge.errors import EngineError, IpcBridgeError, MappingError, error_type
from ipcbridge.fence import Lease, caller_id
from ipcbridge.hf import config_dict, model_dir_config
from ipcbridge.manifest import Manifest
from ipcbridge.mapping.registry import get_arch

logger = logging.getLogger(__name__)


def _source(model: Any, seed: int) -> dict[str, Any]:
    """What the engine loads (``hf.load_hf_state_dict``'s source), checked here in milliseconds: a model
    directory's config and weights files, and that the architecture has a vLLM-layout table (what the engine
    maps its weights with). Nothing is imported or loaded that the caller's process does not already have."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        source: dict[str, Any] = {"path": str(path.resolve())}
        config = model_dir_config(path)
    elif isinstance(model, Mapping) or hasattr(model, "to_dict"):
        config = config_dict(model) or {}
        source = {"config": config, "seed": seed}  # JSON-safe: the source travels as JSON
    else:
        raise TypeError(
            f"LocalEngine takes a transformers config, a config dict or a local path, got {type(model).__name__}"
        )
    try:
        get_arch(config, "vllm")  # the table the engine maps its weights with
    except MappingError as e:
        raise MappingError(f"LocalEngine cannot serve this model: {e}") from None
    return source


# The last line of a Python traceback for one of ipcbridge's own errors, as the engine's log ends when it
# fails to start: Note [error types cross processes] (only the names ``error_type`` knows become types).
_START_ERROR = re.compile(r"^ipcbridge\.errors\.(\w+): (.*)$")


def _start_error(log: list[str], code: int) -> IpcBridgeError:
    """The error to raise for an engine that exited while starting: the child's own ipcbridge error type and
    message where its log ends in one, else ``EngineError``; either way with the log's tail."""
    tail = "\n".join(log[-15:])
    for i in range(len(log) - 1, -1, -1):
        m = _START_ERROR.match(log[i])
        if m is not None:
            message = "\n".join([m.group(2), *log[i + 1:]]).strip()
            return error_type(m.group(1), EngineError)(
                f"{message}\n(raised in the engine process, which exited with code {code} while starting; its "
                f"log ends:\n{tail})"
            )
    return EngineError(f"engine process exited with code {code} while starting:\n{tail}")


def _stop(proc: subprocess.Popen[bytes], workdir: str) -> None:
    """Stop the engine process and remove its private directory. Safe to call twice."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)


class LocalEngine:
    """The embedded engine, running in a child process. Constructing it starts the process.

    ``model`` is a ``transformers`` config (random weights from ``seed``), its ``to_dict()``, or a local
    directory with ``config.json`` and ``*.safetensors``. ``device`` defaults to ``"cuda"`` when available
    (weights shared over CUDA IPC), else ``"cpu"`` (shared through /dev/shm). The engine owns the weights;
    ``ipcbridge.connect(engine)`` gives a trainer views of them. ``close()`` (or leaving ``with``) stops it.

    The arguments are checked before the process starts, in milliseconds: ``FileNotFoundError`` for a
    directory without ``config.json`` or weights, ``MappingError`` for a config without ``model_type`` or an
    architecture ipcbridge does not map, ``ValueError`` for a bad ``device`` or ``dtype``. An ipcbridge error
    the engine raises while starting arrives as its own type too (with the engine log's tail).
    """

    def __init__(
        self,
        model: Any,
        *,
        device: str | None = None,
        seed: int = 0,
        dtype: torch.dtype | str | None = None,
        start_timeout: float = 120.0,
        request_timeout: float = 60.0,
    ) -> None:
        # Everything that can be checked without the model is checked here, before the engine starts (which
        # takes seconds): a bad argument fails in milliseconds, in the caller's process, as its own type.
        self.device = engine_device(device)
        dtype_name = engine_dtype(dtype, self.device)
        self.request_timeout = request_timeout
        #: The model's context and vocabulary, from the engine's first ping: requests are checked against them
        #: here, before they are sent (Note [bounded requests] in ipcbridge.engine.inputs).
        self.limits: Limits | None = None
        source = _source(model, seed)
        # Note [control channel security]: a private 0700 directory holds the socket and the log.
        self._dir = tempfile.mkdtemp(prefix="ipcbridge-engine-")
        self._token = secrets.token_urlsafe(32)
        self.socket_path = os.path.join(self._dir, "engine.sock")
        self.log_path = os.path.join(self._dir, "engine.log")
        Path(self._dir, "source.json").write_text(json.dumps(source))
        cmd = [
            sys.executable, "-m", "ipcbridge.engine.server", "--socket", self.socket_path,
            "--source", os.path.join(self._dir, "source.json"), "--device", self.device, "--dtype", dtype_name,
            "--parent", str(os.getpid()),
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_package_root(), os.environ.get("PYTHONPATH")]))}
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._dir)
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(self._token.encode() + b"\n")
            self._proc.stdin.close()
            self._wait_ready(start_timeout)
        except BaseException:
            self.close()
            raise

    # -- process management --------------------------------------------------------------------------

    def _log_lines(self) -> list[str]:
        try:
            return Path(self.log_path).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ["(no log)"]

    def _log_tail(self, lines: int = 15) -> str:
        return "\n".join(self._log_lines()[-lines:])

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise _start_error(self._log_lines(), code)
            if os.path.exists(self.socket_path):
                try:
                    pong = protocol.call(self.socket_path, self._token, "ping", timeout=5.0)
                except EngineError:
                    time.sleep(0.05)
                    continue
                self.limits = Limits.from_dict(pong)
                return
            time.sleep(0.05)
        raise EngineError(f"engine did not start within {timeout:.0f}s:\n{self._log_tail()}")

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def _call(self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        code = self._proc.poll()
        if code is not None:
            raise EngineError(
                f"engine process {self._proc.pid} has exited (code {code}); start a new LocalEngine.\n"
                f"{self._log_tail(5)}"
            )
        try:
            return protocol.call(self.socket_path, self._token, op, args, timeout=timeout or self.request_timeout)
        except EngineError as e:
            # A killed engine closes its socket a moment before it can be reaped: give it that moment, so the
            # error says "exited" rather than a bare "connection closed".
            try:
                code = self._proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                raise EngineError(f"engine process exited (code {code}) during {op!r}:\n{self._log_tail(5)}") from None
            raise e

    def close(self) -> None:
        """Stop the engine process and remove its socket directory. Views a trainer holds stay readable."""
        if self._proc.poll() is None:
            try:
                protocol.call(self.socket_path, self._token, "shutdown", timeout=5.0)
                self._proc.wait(timeout=10)
            except (EngineError, subprocess.TimeoutExpired):
                pass
        self._finalizer()

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- API -----------------------------------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], max_tokens: int = 16, temperature: float = 0.0, seed: int | None = None,
        *, n: int = 1, top_p: float = 1.0, top_k: int = 0, stop_token_ids: list[int] | tuple[int, ...] = (),
        ignore_eos: bool = True, logprobs: str = "raw",
    ) -> list[GenerateOutput]:
        """Complete each prompt (token ids). Greedy at ``temperature=0``; ``seed`` makes sampling repeatable.

        vLLM's sampling knobs, with vLLM's meanings (Note [sampling like vLLM] in
        :mod:`ipcbridge.engine.inputs`): ``n`` completions per prompt (returned prompt-major:
        ``len(prompts) * n`` outputs), ``top_p``, ``top_k`` (0 or -1: off), ``stop_token_ids``,
        ``ignore_eos=False`` to also stop at the model's EOS ids (from its generation config), and
        ``logprobs="processed"`` for logprobs after the temperature (default ``"raw"``).

        Each prompt plus ``max_tokens`` must fit the model's context (``max_position_embeddings``): checked
        here, before anything is sent, and again by the engine (``RequestError`` naming the argument).
        """
        sampling = Sampling(n=n, top_p=top_p, top_k=top_k, stop_token_ids=tuple(stop_token_ids)
                            if isinstance(stop_token_ids, (list, tuple)) else stop_token_ids,
                            ignore_eos=ignore_eos, logprobs=logprobs)
        if self.limits is not None:
            self.limits.check_generate(prompts, max_tokens, temperature, seed, sampling)
        result = self._waiting_call(
            "generate", {"prompts": prompts, "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
                         "sampling": sampling.to_dict()},
        )
        return [GenerateOutput(**r) for r in result]

    def score(self, prompt: list[int], completion: list[int]) -> list[float]:
        """The engine's logprob of each ``completion`` token after ``prompt`` (one full forward pass)."""
        if self.limits is not None:
            self.limits.check_score(prompt, completion)
        return list(self._waiting_call("score", {"prompt": prompt, "completion": completion}))

    def _waiting_call(self, op: str, args: dict[str, Any]) -> Any:
        """A request that may wait at the engine's pause gate. See Note [no hangs] for the two deadlines: the
        engine stops the request at ``deadline`` (Note [bounded requests]), its reply arrives before ours."""
        args = {**args, "wait": self.request_timeout, "deadline": self.request_timeout, "caller": caller_id()}
        return self._call(op, args, timeout=self.request_timeout + protocol.REPLY_GRACE)

    def manifest(self) -> Manifest:
        return Manifest.from_dict(self._call("manifest"))

    @property
    def weight_version(self) -> int:
        """The engine's weight version (it owns it: every resume moves it forward)."""
        return int(self._call("ping")["version"])

    @property
    def paused_by(self) -> str | None:
        """Who holds the engine's pause, or ``None``."""
        return self._call("ping")["holder"]

    def stats(self) -> dict[str, Any]:
        return dict(self._call("stats"))

    # -- streamed weights (ipcbridge.stream; Note [streamed weights] in stream.receiver) ---------------

    def stream_init(self, stream_id: str, *, host: str, port: int, backend: str, timeout: float,
                    plan: Mapping[str, Any]) -> None:
        """Join the trainer's stream group at ``host:port`` as rank 1 (replacing any previous stream).

        Blocks until the trainer joins too. ``stream_id`` names the stream in the calls below; the engine
        checks ``plan`` against its weights here, once, and receives every later push by it.
        """
        self._call("stream_init", {"stream_id": stream_id, "host": host, "port": port, "backend": backend,
                                   "timeout": timeout, "plan": dict(plan)}, timeout=timeout + self.request_timeout)

    def stream_receive(self, stream_id: str, *, timeout: float) -> dict[str, Any]:
        """Receive one push of the stream's plan into the engine's weights (engine paused). Blocks until loaded."""
        return dict(self._call("stream_receive", {"stream_id": stream_id}, timeout=timeout))

    def stream_close(self, stream_id: str) -> None:
        self._call("stream_close", {"stream_id": stream_id})

    def ipcbridge_endpoint(self) -> LocalEndpoint:
        return LocalEndpoint(self)


class LocalEndpoint:
    """The bridge's view of a LocalEngine. Closing it leaves the engine running.

    The engine keeps the lease (Note [pause gate] in :mod:`ipcbridge.engine.core`); ``drain`` bounds the
    wait for in-flight generation once the pause is granted.
    """

    name = "local-engine"

    def __init__(self, engine: LocalEngine, drain: float | None = None) -> None:
        self.engine = engine
        self.drain = engine.request_timeout if drain is None else drain

    def manifest(self) -> Manifest:
        return self.engine.manifest()

    def pause(self, lease: Lease, wait: float) -> None:
        deadline = wait + self.drain + protocol.REPLY_GRACE
        self.engine._call("pause", {"lease": lease.to_dict(), "wait": wait, "drain": self.drain}, timeout=deadline)

    def renew(self, lease: Lease) -> None:
        self.engine._call("renew", {"lease": lease.to_dict()})

    def resume(self, lease: Lease) -> int:
        return int(self.engine._call("resume", {"lease": lease.to_dict()}))

    def cancel(self, lease: Lease) -> None:
        self.engine._call("cancel", {"lease": lease.to_dict()})

    def close(self) -> None:
        pass

    def stream_init(self, stream_id: str, *, host: str, port: int, backend: str, timeout: float,
                    plan: Mapping[str, Any]) -> None:
        self.engine.stream_init(stream_id, host=host, port=port, backend=backend, timeout=timeout, plan=plan)

    def stream_receive(self, stream_id: str, *, timeout: float) -> dict[str, Any]:
        return self.engine.stream_receive(stream_id, timeout=timeout)

    def stream_close(self, stream_id: str) -> None:
        self.engine.stream_close(stream_id)

    def sample(self, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        out = self.engine.generate([prompt], max_tokens=max_tokens, temperature=0.0)[0]
        return out.token_ids, out.logprobs


def _package_root() -> str:
    # The child must import this very ipcbridge, also when it runs from a source checkout.
    return str(Path(__file__).resolve().parents[2])
