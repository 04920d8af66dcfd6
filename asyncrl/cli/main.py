"""`asyncrl` command line: `asyncrl train [CONFIG] [--set a.b=c ...]`.

User errors (AsyncrlError) print one message and exit with code 2; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import resources
from pathlib import Path

from asyncrl.errors import AsyncrlError

DEFAULT_RECIPE = "tiny.yaml"
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a terminated process


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncrl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run an RL job (the built-in CPU example by default)")
    source = train.add_mutually_exclusive_group()
    source.add_argument("config", nargs="?", help=f"job YAML (default: recipe {DEFAULT_RECIPE})")
    source.add_argument("--resume", metavar="RUN_DIR",
                        help="continue a run from its checkpoint (its resolved config + --set)")
    train.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a field, e.g. --set rollout.n_samples=4")
    train.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or embedded)")
    train.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    train.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")
    return parser


def _train(args: argparse.Namespace) -> int:
    from asyncrl.config import load_config
    from asyncrl.controller.run import load_resume_config, run

    if args.resume:
        config = load_resume_config(Path(args.resume), args.overrides)
    else:
        path = args.config or resources.files("asyncrl.recipes").joinpath(DEFAULT_RECIPE)
        config = load_config(path, args.overrides)
    result = run(config, address=args.address, resume=bool(args.resume))
    if result.interrupted:
        print(f"stopped by SIGTERM; checkpoint saved. Continue with: "
              f"asyncrl train --resume {result.run_dir}")
        return EXIT_TERMINATED
    first, last = result.evals[0][1], result.evals[-1][1]
    print(f"held-out accuracy: {first:.1%} at the first evaluation -> {last:.1%} at the last "
          f"({(last - first) * 100:+.1f} points)")
    print(f"run directory: {result.run_dir}  (config.resolved.yaml, metrics.jsonl, final_model/)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return _train(args)
    except AsyncrlError as exc:
        if args.debug:
            raise
        print(f"asyncrl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
