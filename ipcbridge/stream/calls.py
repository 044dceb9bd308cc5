"""The engine's half of a stream step, run beside the trainer's: an RPC in a daemon thread.

Opening a stream and pushing through it both take two halves at once: the engine's, an RPC that blocks
until its side is done (joining the group, receiving every bucket), and the trainer's, in this thread
(joining, packing and broadcasting). :class:`EngineCall` runs the RPC; when either half fails, the
``BridgeError`` it raises names both, since the one that failed first is usually the cause.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ipcbridge.errors import BridgeError

#: How long to wait for the engine's side of a failed transfer to report, after ours failed.
GRACE_SECONDS = 5.0


def failure(what: str, local: BaseException | None, remote: BaseException | None, fix: str) -> BridgeError:
    """The error of a failed ``what``: the engine's error (``remote``), the trainer's (``local``), ``fix``."""
    parts = []
    if remote is not None:
        parts.append(f"engine: {remote}")
    if local is not None:
        parts.append(f"trainer: {type(local).__name__}: {local}")
    return BridgeError(f"{what} failed ({'; '.join(parts) or 'no error reported'}). {fix}")


class EngineCall:
    """An engine RPC in a daemon thread, so this thread can do the trainer's half meanwhile."""

    def __init__(self, fn: Callable[[], Any], what: str, on_error: Callable[[], None] | None = None) -> None:
        self.what = what
        self.result: Any = None
        self.error: BaseException | None = None
        self._on_error = on_error  # tells the trainer's half to stop waiting for the engine
        self._thread = threading.Thread(target=self._run, args=(fn,), name=f"ipcbridge-{what}", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as e:  # reported by the thread that joins
            self.error = e
            if self._on_error is not None:
                self._on_error()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float | None) -> bool:
        self._thread.join(timeout)
        return self.done()

    def failed(self, local: BaseException, what: str, fix: str) -> BridgeError:
        """The trainer's half failed with ``local``: the error, once the engine's half had a moment to report."""
        self.join(GRACE_SECONDS)
        return failure(what, local, self.error, fix)

    def finish(self, timeout: float | None, what: str, fix: str, abort: Callable[[], None]) -> None:
        """The trainer's half succeeded: wait ``timeout`` (None: the RPC's own bounds it) for the engine's.
        If it failed or is late, ``abort()`` the trainer's side and raise."""
        if self.join(timeout) and self.error is None:
            return
        abort()
        raise failure(what, None, self.error or BridgeError(f"{self.what} did not return within {timeout:.0f}s"),
                      fix)
