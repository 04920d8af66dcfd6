"""`asyncrl` command line: `asyncrl train [CONFIG] [--set a.b=c ...]`, `serve-reward`, `scale`,
`report`.

User errors (AsyncrlError) print one message and exit with code 2; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path

from asyncrl.errors import AsyncrlError, ConfigError

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
    _add_serve_reward(sub)
    report = sub.add_parser("report", help="write an HTML page with plots of a run")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (runs/<name>)")
    report.add_argument("--out", metavar="DIR", help="where to write (default RUN_DIR/report)")
    report.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    report.add_argument("-q", "--quiet", action="store_true", help="only warnings")
    scale = sub.add_parser("scale", help="resize a running job's rollout pool")
    scale.add_argument("run_dir", metavar="RUN_DIR", help="the running job's run directory")
    scale.add_argument("--rollout-workers", type=int, required=True, metavar="N",
                       help="rollout workers wanted (applied between training steps)")
    scale.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    scale.add_argument("-q", "--quiet", action="store_true", help="only warnings")
    return parser


def _scale(args: argparse.Namespace) -> int:
    from asyncrl.config import RESOLVED_NAME
    from asyncrl.controller.control import write_control

    run_dir = Path(args.run_dir)
    if not (run_dir / RESOLVED_NAME).is_file():
        raise ConfigError(f"RUN_DIR: {str(run_dir)!r} is not a run directory (no "
                          f"{RESOLVED_NAME}); pass the directory `asyncrl train` printed")
    if args.rollout_workers < 1:
        raise ConfigError(f"--rollout-workers: need at least 1 (got {args.rollout_workers})")
    path = write_control(run_dir, rollout_workers=args.rollout_workers)
    print(f"asked for {args.rollout_workers} rollout workers ({path}); the job applies it "
          "before its next step")
    return 0


def _add_serve_reward(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve-reward", help="serve a reward function over gRPC until SIGTERM/SIGINT",
        description="Serve a reward over gRPC (Score, ScoreBatch, grpc.health.v1). Every RPC "
                    "must carry 'authorization: Bearer <token>'; there is no unauthenticated mode.")
    serve.add_argument("--fn", required=True, metavar="NAME",
                       help="a registered reward name, or 'package.module:function' taking "
                            "(prompt, response) and returning a float or Reward")
    serve.add_argument("--port", type=int, required=True, help="TCP port; 0 picks a free one")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it, use TLS)")
    token = serve.add_mutually_exclusive_group()
    token.add_argument("--token-env", metavar="VAR", help="environment variable holding the token")
    token.add_argument("--token-file", metavar="PATH", help="file holding the token")
    serve.add_argument("--tls-cert", metavar="PEM", help="server certificate (with --tls-key)")
    serve.add_argument("--tls-key", metavar="PEM", help="server private key (with --tls-cert)")
    serve.add_argument("--kwargs", default="{}", metavar="JSON",
                       help='keyword arguments of the reward, a JSON object, e.g. \'{"k": 1}\'')
    serve.add_argument("--task", default="sort_digits",
                       help="procedural task whose scorer `--fn task` uses (default sort_digits)")
    serve.add_argument("--max-concurrency", type=int, default=64,
                       help="rewards scored at once (default 64)")
    serve.add_argument("--timeout-s", type=float, default=None,
                       help="longest one reward may take; past it the reward fails with status "
                            "timeout (default: no limit beyond the client's deadline)")
    serve.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    serve.add_argument("-q", "--quiet", action="store_true", help="only warnings")


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
    try:
        from asyncrl.metrics.plots import write_report

        print(f"report: {write_report(result.run_dir)}")
    except Exception as exc:  # the run succeeded; a failed plot must not say otherwise
        logging.getLogger(__name__).warning("could not write the report: %s", exc)
    return 0


def _report(args: argparse.Namespace) -> int:
    from asyncrl.metrics.plots import write_report

    out = Path(args.out) if args.out else None
    print(f"report: {write_report(Path(args.run_dir), out)}")
    return 0


def _serve_token(args: argparse.Namespace) -> str:
    if args.token_env:
        token = os.environ.get(args.token_env, "").strip()
        if not token:
            raise ConfigError(f"--token-env: environment variable {args.token_env!r} is not set "
                              "or empty; export the token in it")
        return token
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file: cannot read {args.token_file} ({exc.strerror})"
                              ) from None
        if not token:
            raise ConfigError(f"--token-file: {args.token_file} is empty")
        return token
    raise ConfigError("serve-reward needs a token: pass --token-env VAR or --token-file PATH "
                      "(clients send it as 'authorization: Bearer <token>')")


def _serve_reward(args: argparse.Namespace) -> int:
    from asyncrl.data.tasks import TASKS
    from asyncrl.reward import build_reward
    from asyncrl.reward.remote.server import RewardServer, serve_until_signal

    token = _serve_token(args)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: pass both, or neither")
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--kwargs: not valid JSON ({exc})") from None
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--kwargs: expected a JSON object, got {args.kwargs!r}")
    if args.task not in TASKS:
        raise ConfigError(f"--task: unknown task {args.task!r}; known: {', '.join(sorted(TASKS))}")
    reward = build_reward(args.fn, TASKS[args.task](), kwargs)
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    server = RewardServer(reward, token=token, host=args.host, port=args.port, tls=tls,
                          max_concurrency=args.max_concurrency, timeout_s=args.timeout_s)
    mode = "TLS" if tls else "plaintext"
    asyncio.run(serve_until_signal(server, on_ready=lambda address: print(
        f"serving reward {args.fn} on {address} ({mode}); stop with SIGTERM or Ctrl-C",
        flush=True)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        commands = {"train": _train, "serve-reward": _serve_reward, "scale": _scale,
                    "report": _report}
        return commands[args.command](args)
    except AsyncrlError as exc:
        if args.debug:
            raise
        print(f"asyncrl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
