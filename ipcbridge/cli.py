"""The ``ipcbridge`` command line. The only place in the package that prints."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ipcbridge._version import __version__


def _demo(args: argparse.Namespace) -> int:
    from ipcbridge import demo

    log = None if args.json else print
    if log:
        print(f"ipcbridge {__version__} demo: engine={args.engine}, {args.steps} steps, reward = share of "
              f"sampled tokens equal to token {demo.TARGET_TOKEN}")
    s = demo.run(engine=args.engine, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                 device=args.device, dtype=args.dtype, precision=args.precision, log=log)
    if args.json:
        print(json.dumps(demo.summary_dict(s)))
        return 0
    mib = 1 / (1 << 20)
    print(
        f"\nreward {s.reward_first:.3f} -> {s.reward_last:.3f} over {s.steps} steps ({s.seconds:.1f}s, {s.device})\n"
        f"transport            {s.transport}\n"
        f"weights              {s.dtype}, master_weights {s.precision}\n"
        f"attach               {s.attach_seconds * 1e3:.1f} ms\n"
        f"fence (median)       {s.fence_seconds_median * 1e3:.2f} ms\n"
        f"trainer weight bytes {s.trainer_weight_bytes} (model weights: {s.model_weight_bytes * mib:.2f} MiB)"
        + (f"\ncuda alloc at attach {s.cuda_allocated_delta_bytes} bytes" if s.cuda_allocated_delta_bytes is not None else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ipcbridge", description="Zero-copy weight sharing between an inference engine and a trainer.")
    ap.add_argument("--version", action="version", version=f"ipcbridge {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="colocated RL on a tiny random Llama: the reward climbs as the trainer writes the engine's weights")
    d.add_argument("--engine", choices=["local", "vllm"], default="local", help="embedded engine (default) or vLLM (GPU)")
    d.add_argument("--steps", type=int, default=30)
    d.add_argument("--batch", type=int, default=16)
    d.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: %(default)s)")
    d.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="the engine's weight dtype (default: %(default)s)")
    d.add_argument("--precision", choices=["remainder", "fp32", "stochastic", "none"], default="remainder",
                   help="master_weights mode for bf16/fp16 weights; 'none' steps them directly (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default=None, help="engine device (default: cuda if available, else cpu)")
    d.add_argument("--json", action="store_true", help="print only the summary, as one JSON object")
    d.set_defaults(func=_demo)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
