"""The ``ipcbridge`` command line. The only place in the package that prints.

Importing this module imports no torch (``ipcbridge --version`` must be instant); the demo and torch load
inside the subcommand, after its arguments are checked, so a bad value fails in milliseconds with one line:
``ipcbridge: error: <cause>; <fix>`` (exit code 2). ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import math
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from ipcbridge._version import __version__
from ipcbridge.errors import IpcBridgeError

USAGE_ERROR = 2  # argparse's exit code for bad arguments; ours match it


class UsageError(Exception):
    """A bad argument or a missing extra, found before anything starts."""

    def __init__(self, cause: str, fix: str) -> None:
        super().__init__(f"{cause}; {fix}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # one line, like every other error of this command, instead of argparse's usage block
        self.exit(USAGE_ERROR, f"ipcbridge: error: {message}; see '{self.prog} --help'\n")


def _global_options(default: Any) -> argparse.ArgumentParser:
    """-v/-q as a parent parser. The subcommand's copy defaults to SUPPRESS, so ``ipcbridge -v demo`` is not
    reset to False by the subparser's own default; either position sets the same attribute."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="log at INFO level and show tracebacks of errors")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="print only the result: no start-up progress, no per-step rows")
    return p


def _demo_parser(sub: Any) -> None:
    d = sub.add_parser(
        "demo", parents=[_global_options(argparse.SUPPRESS)],
        help="colocated RL on a tiny random Llama: the reward climbs as the trainer writes the engine's weights",
        description="Colocated RL on a tiny random Llama. The reward is the share of sampled tokens equal to "
                    "token 7; it climbs because the trainer writes the very weights the engine samples from.",
    )
    d.add_argument("--engine", choices=["local", "vllm"], default="local",
                   help="'local': the embedded engine (CPU or GPU); 'vllm': vLLM on a GPU, needs ipcbridge[vllm] (default: %(default)s)")
    d.add_argument("--steps", type=int, default=30, help="RL steps, at least 1 (default: %(default)s)")
    d.add_argument("--batch", type=int, default=16, help="prompts sampled per step, at least 1 (default: %(default)s)")
    d.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate, 0 < lr <= 1 (default: %(default)s)")
    d.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="the engine's weight dtype (default: %(default)s)")
    d.add_argument("--precision", choices=["remainder", "fp32", "stochastic", "none"], default="remainder",
                   help="master_weights mode for bf16/fp16 weights; 'none' steps them directly (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="seed of the model, prompts and sampling, >= 0 (default: %(default)s)")
    d.add_argument("--device", default=None, help="engine device: cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    d.add_argument("--json", action="store_true",
                   help="print only the summary, as one JSON object with per-step data, on stdout (progress goes to stderr)")
    d.add_argument("--plot", metavar="FILE", default=None,
                   help="write a PNG of the reward curve to FILE (needs ipcbridge[plot])")
    d.set_defaults(func=_demo, check=_check_demo)


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="ipcbridge", parents=[_global_options(False)],
                 description="Zero-copy weight sharing between an inference engine and a trainer.")
    ap.add_argument("--version", action="version", version=f"ipcbridge {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _demo_parser(sub)
    return ap


# -- checks: every one runs before the engine starts ----------------------------------------------------


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("steps", "batch"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} {getattr(args, name)} is too small", f"pass --{name} 1 or more")
    if not (0 < args.lr <= 1) or math.isnan(args.lr):
        raise UsageError(f"--lr {args.lr:g} is out of range", "pass 0 < lr <= 1 (default 0.003)")
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed} is negative", "pass a seed >= 0")


def _check_device(device: str | None) -> None:
    if device is None or device == "cpu":
        return
    import torch  # only here: a plain CPU run never needs it before the demo loads it anyway

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device", "pass cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        raise UsageError(f"--device {device!r} is not supported by the demo", "pass cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build, but no GPU is visible"
        raise UsageError(f"--device {device} but this torch ({torch.__version__}) is {build}",
                         "pass --device cpu, or run on a GPU machine with a CUDA build of torch")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device} but only {torch.cuda.device_count()} GPU(s) are visible",
                         f"pass cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def _check_demo(args: argparse.Namespace) -> None:
    _check_numbers(args)
    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UsageError("--engine vllm needs vLLM, which is not installed",
                         'pip install "ipcbridge[vllm]" on a GPU machine, or use --engine local')
    if args.plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot needs matplotlib, which is not installed", 'pip install "ipcbridge[plot]"')
        folder = Path(args.plot).resolve().parent
        if not folder.is_dir():
            raise UsageError(f"--plot {args.plot}: folder {folder} does not exist", "create it or pick another path")
    _check_device(args.device)


# -- the demo ---------------------------------------------------------------------------------------------


def _print_summary(s: Any, plot: str | None) -> None:
    mib = 1 / (1 << 20)
    w = min(s.reward_window, s.steps)  # a 2-step run averages 2 steps, and says so
    lines = [
        f"\nsummary: {s.steps} steps in {s.seconds:.1f} s on {s.device} (engine start {s.engine_start_seconds:.1f} s)",
        f"reward, step 0              {s.per_step[0].reward:.3f}",
        f"reward, step {s.steps - 1:<15d}{s.per_step[-1].reward:.3f}",
        f"reward, mean of last {w:<7d}{s.reward_last:.3f}   (first {w}: {s.reward_first:.3f})",
        f"transport                   {s.transport}",
        f"weights                     {s.dtype}, master_weights {s.precision}",
        f"attach                      {s.attach_seconds * 1e3:.1f} ms",
        f"fence (median)              {s.fence_seconds_median * 1e3:.2f} ms",
        f"trainer weight bytes        {s.trainer_weight_bytes} (model weights: {s.model_weight_bytes * mib:.2f} MiB)",
    ]
    if s.cuda_allocated_delta_bytes is not None:
        lines.append(f"cuda alloc at attach        {s.cuda_allocated_delta_bytes} bytes")
    if plot:
        lines.append(f"reward curve                {plot}")
    print("\n".join(lines))


def _demo(args: argparse.Namespace) -> int:
    from ipcbridge import demo  # imports torch: only once the arguments are known to be good

    # --json keeps stdout for the JSON object; progress then goes to stderr
    log = None if args.quiet else functools.partial(print, file=sys.stderr if args.json else sys.stdout, flush=True)
    if log:
        log(f"ipcbridge {__version__} demo: {args.engine} engine, {args.steps} steps of {args.batch} prompts; "
            f"reward = share of sampled tokens equal to token {demo.TARGET_TOKEN}")
    s = demo.run(engine=args.engine, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                 device=args.device, dtype=args.dtype, precision=args.precision, log=log)
    if args.plot:
        demo.plot(s, args.plot)
    if args.json:
        print(json.dumps(demo.summary_dict(s)))
    else:
        _print_summary(s, args.plot)
    return 0


# -- entry point ------------------------------------------------------------------------------------------


def _fail(e: BaseException, verbose: bool) -> int:
    """One line on stderr; the traceback first under -v. Multi-line messages (an engine's log tail) keep
    their first line here and the rest under -v."""
    if verbose:
        traceback.print_exception(e)
    text = str(e).strip() or type(e).__name__
    first, _, rest = text.partition("\n")
    if not isinstance(e, UsageError):
        first = f"{type(e).__name__}: {first}"
    if rest and not verbose:
        first += " (run with -v for details)"
    print(f"ipcbridge: error: {first}", file=sys.stderr)
    return USAGE_ERROR


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING,
                        stream=sys.stderr)
    try:
        args.check(args)
        return args.func(args)
    except (UsageError, IpcBridgeError, ValueError) as e:
        return _fail(e, args.verbose)
    except ImportError as e:
        # a missing extra found only at run time (e.g. a vLLM whose own dependencies are broken)
        return _fail(e, args.verbose)
    except KeyboardInterrupt:
        print("ipcbridge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
