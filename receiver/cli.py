"""`episode-receiver`: serve, check-config, add-host, remove-host.

CLI -> config -> server, as uvicorn does it: a bad config or an unusable
data_dir prints one line and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from episode_common.cli_support import fail, setup_logging
from episode_common.config_loading import ConfigError
from receiver import __version__
from receiver.config import (
    ReceiverConfig,
    ensure_data_dir,
    load_config,
    with_server_overrides,
)
from receiver.dev_config import dev_config

PROG = "episode-receiver"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Receive episode tarballs from lab hosts; accept only recent code.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the receiver")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="the receiver's TOML config file")
    source.add_argument(
        "--dev",
        action="store_true",
        help="use the built-in development config: 127.0.0.1, data under ./var, "
        "version gate on the git checkout in the current directory, no auth",
    )
    serve.add_argument("--host", help="override [server] host")
    serve.add_argument("--port", type=int, help="override [server] port")
    serve.add_argument("--workers", type=int, help="override [server] workers")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])

    check = commands.add_parser(
        "check-config", help="validate the config, the gate repository and the data dir"
    )
    check.add_argument("--config", type=Path, required=True)

    add_host = commands.add_parser("add-host", help="mint a token for HOST, print it once")
    add_host.add_argument("host_id", metavar="HOST")
    add_host.add_argument("--config", type=Path, required=True)
    add_host.add_argument(
        "--rotate", action="store_true", help="replace HOST's existing token (the old one stops)"
    )

    remove_host = commands.add_parser("remove-host", help="revoke HOST's token")
    remove_host.add_argument("host_id", metavar="HOST")
    remove_host.add_argument("--config", type=Path, required=True)
    return parser


def _load(args: argparse.Namespace) -> ReceiverConfig:
    try:
        if getattr(args, "dev", False):
            return dev_config(Path.cwd())
        return load_config(args.config)
    except ConfigError as error:
        fail(PROG, f"config: {error}")


def _cmd_serve(args: argparse.Namespace) -> int:
    from receiver.recovery import StartupError
    from receiver.server import run_server

    overrides = {"host": args.host, "port": args.port, "workers": args.workers}
    changed = {key: value for key, value in overrides.items() if value is not None}
    try:
        config = with_server_overrides(_load(args), changed)
        ensure_data_dir(config)
    except ConfigError as error:
        fail(PROG, f"config: {error}")
    setup_logging(args.log_level)
    try:
        return run_server(config, log_level=args.log_level)
    except StartupError as error:
        fail(PROG, str(error), code=error.exit_code)


def _cmd_check_config(args: argparse.Namespace) -> int:
    from receiver.checks import check_all

    config = _load(args)
    problem = check_all(config)
    if problem is not None:
        fail(PROG, problem)
    print(f"{PROG}: {config.source}: ok")
    return 0


def _tokens_file(args: argparse.Namespace) -> Path:
    """The configured tokens file, after checking HOST and that auth.mode is "tokens"."""
    from receiver.errors import InvalidId
    from receiver.ids import check_id

    try:
        check_id("HOST", args.host_id)
    except InvalidId as error:
        fail(PROG, f"{error.detail} (got {args.host_id!r})")
    config = _load(args)
    tokens_file = config.auth.tokens_file
    if config.auth.mode != "tokens" or tokens_file is None:
        fail(
            PROG,
            f'{config.source}: auth.mode is "{config.auth.mode}"; '
            f'{args.command} needs auth.mode = "tokens" and auth.tokens_file',
        )
    return tokens_file


def _cmd_add_host(args: argparse.Namespace) -> int:
    from receiver.auth import HostHasToken, add_host

    tokens_file = _tokens_file(args)
    host = args.host_id
    try:
        token = add_host(tokens_file, host, rotate=args.rotate)
    except HostHasToken as error:
        fail(
            PROG,
            f"{host} already has a token (created {error.created_at}); --rotate replaces it",
            1,
        )
    except ConfigError as error:
        fail(PROG, str(error))
    except OSError as error:
        fail(PROG, f"cannot update {tokens_file}: {error.strerror or error}", 1)
    # stdout carries the token alone, so `add-host HOST --config F > token` works.
    print(token, flush=True)
    replaced = f"; {host}'s previous token stops working" if args.rotate else ""
    print(
        f"{PROG}: token for {host} printed once (only its SHA-256 is kept in {tokens_file}). "
        f"On {host}, save it to the file named by token_file in the shipper's config, mode 0600; "
        f"the receiver accepts it within a second, no restart{replaced}.",
        file=sys.stderr,
    )
    return 0


def _cmd_remove_host(args: argparse.Namespace) -> int:
    from receiver.auth import remove_host

    tokens_file = _tokens_file(args)
    host = args.host_id
    try:
        removed = remove_host(tokens_file, host)
    except ConfigError as error:
        fail(PROG, str(error))
    except OSError as error:
        fail(PROG, f"cannot update {tokens_file}: {error.strerror or error}", 1)
    if not removed:
        fail(PROG, f"{host} has no token in {tokens_file}; nothing removed", 1)
    print(f"{PROG}: revoked {host}'s token; the receiver refuses it within a second")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = _build_parser().parse_args(argv)
    handlers = {
        "serve": _cmd_serve,
        "check-config": _cmd_check_config,
        "add-host": _cmd_add_host,
        "remove-host": _cmd_remove_host,
    }
    sys.exit(handlers[args.command](args))
