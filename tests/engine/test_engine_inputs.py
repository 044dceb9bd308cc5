"""Engine inputs are bounded: by the model's context before anything is sent, and by each request's deadline
and its client's presence while it runs (Note [bounded requests] in ipcbridge.engine.inputs)."""

from __future__ import annotations

import math
import time

import pytest

import ipcbridge
from ipcbridge import EngineError
from ipcbridge.engine import protocol
from tests.helpers import tiny_config

PROMPT = [3, 14, 15, 92]


@pytest.fixture(scope="module")
def engine():
    """Context 128 (tiny_config's max_position_embeddings)."""
    with ipcbridge.LocalEngine(tiny_config("llama"), device="cpu", request_timeout=5.0) as eng:
        yield eng


@pytest.fixture(scope="module")
def long_engine():
    """A 4096-token context: generating all of it takes many seconds on CPU, far past the 1 s deadline."""
    with ipcbridge.LocalEngine(tiny_config("llama", max_position_embeddings=4096), device="cpu",
                               request_timeout=1.0) as eng:
        yield eng


def test_the_client_knows_the_limits(engine) -> None:
    assert engine.limits is not None
    assert (engine.limits.context, engine.limits.vocab) == (128, 100)


def test_max_tokens_beyond_the_context_is_refused_before_sending(engine) -> None:
    requests = engine.stats()["requests"]
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"max_position_embeddings=128\); ask for at most 124 tokens"):
        engine.generate([PROMPT], max_tokens=1_000_000)
    assert time.monotonic() - t0 < 0.5
    assert engine.stats()["requests"] == requests


def test_the_engine_refuses_it_too(engine) -> None:
    """A client that skips the local check (or another one) gets the same refusal from the engine."""
    args = {"prompts": [PROMPT], "max_tokens": 1_000_000, "wait": 1.0, "deadline": 2.0}
    with pytest.raises(EngineError, match=r"max_position_embeddings=128"):
        protocol.call(engine.socket_path, engine._token, "generate", args, timeout=4)
    assert engine.generate([PROMPT], max_tokens=1)[0].token_ids


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": True}, r"max_tokens must be an int >= 1, got True"),
        ({"max_tokens": 2.0}, r"max_tokens must be an int"),
        ({"max_tokens": 0}, r"max_tokens must be an int >= 1, got 0"),
        ({"max_tokens": -5}, r"max_tokens"),
        ({"temperature": math.nan}, r"temperature must be a finite number"),
        ({"temperature": -1.0}, r"temperature"),
        ({"seed": 2**64}, r"seed must be an int in \[-9223372036854775808, 18446744073709551615\]"),
        ({"seed": 1.5}, r"seed must be an int"),
        ({"prompts": [[]]}, r"prompts\[0\] must be a non-empty list of token ids"),
        ({"prompts": []}, r"prompts must be a non-empty list"),
        ({"prompts": [[1] * 128]}, r"prompts\[0\] has 128 tokens and max_tokens=1"),
        ({"prompts": [[True, 2]]}, r"prompts\[0\] must be a non-empty list of token ids in \[0, 100\)"),
    ],
)
def test_bad_generate_arguments_are_named(engine, kwargs, message: str) -> None:
    args = {"prompts": [PROMPT], "max_tokens": 1, **kwargs}
    with pytest.raises(EngineError, match=message):
        engine.generate(**args)


def test_score_must_fit_the_context(engine) -> None:
    with pytest.raises(EngineError, match=r"score: the prompt \(4 tokens\) and completion \(125\)"):
        engine.score(PROMPT, [1] * 125)
    with pytest.raises(EngineError, match=r"score: completion must be a non-empty list"):
        engine.score(PROMPT, [])


def test_a_request_stops_at_its_own_deadline(long_engine) -> None:
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"ran past its deadline of 1\.0s and was stopped"):
        long_engine.generate([PROMPT], max_tokens=4000)
    assert time.monotonic() - t0 < 1.0 + protocol.REPLY_GRACE  # the engine's own reply, not the client's timeout
    t0 = time.monotonic()
    assert long_engine.generate([PROMPT], max_tokens=1)[0].token_ids  # the forward lock is free again
    assert time.monotonic() - t0 < 0.9


def test_a_client_that_gives_up_stops_its_generation(long_engine) -> None:
    args = {"prompts": [PROMPT], "max_tokens": 4000, "wait": 30.0, "deadline": 60.0}
    with pytest.raises(EngineError, match="did not answer"):
        protocol.call(long_engine.socket_path, long_engine._token, "generate", args, timeout=0.5)
    t0 = time.monotonic()
    assert long_engine.generate([PROMPT], max_tokens=1)[0].token_ids  # would wait ~10 s behind the abandoned one
    assert time.monotonic() - t0 < 0.9


def test_a_fence_waits_at_most_for_the_deadline_of_work_in_flight(long_engine) -> None:
    import threading

    bridge = ipcbridge.connect(long_engine)
    errors: list[BaseException] = []

    def long_generation() -> None:
        try:
            long_engine.generate([PROMPT], max_tokens=4000)
        except EngineError as e:  # stopped at its deadline
            errors.append(e)

    t = threading.Thread(target=long_generation)
    t.start()
    time.sleep(0.2)  # the generation is in flight, holding the forward lock
    t0 = time.monotonic()
    with bridge.update():
        pass
    assert time.monotonic() - t0 < 2.0
    t.join(10)
    assert len(errors) == 1 and "deadline" in str(errors[0])
    bridge.close()
