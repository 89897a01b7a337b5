"""The `parley` command: serve, migrate, user create, doctor."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from parley import __version__
from parley.settings import Settings, UnsafeSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description="Real-time chat with AI agents.")
    parser.add_argument("--version", action="version", version=f"parley {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument("--host", help="address to listen on (PARLEY_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (PARLEY_PORT)")
    serve.add_argument("--workers", type=int, help="worker processes (PARLEY_WORKERS)")

    commands.add_parser("migrate", help="apply database migrations")

    user = commands.add_parser("user", help="manage accounts")
    user_commands = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    create = user_commands.add_parser("create", help="create an account")
    create.add_argument("--email", required=True)
    create.add_argument("--admin", action="store_true", help="give the account the admin role")
    create.add_argument("--display-name")
    create.add_argument("--password-stdin", action="store_true",
                        help="read the password from standard input instead of prompting")

    commands.add_parser("doctor", help="print the effective configuration and check every component")

    slo = commands.add_parser("slo", help="service level objectives")
    slo_commands = slo.add_subparsers(dest="slo_command", required=True, metavar="ACTION")
    slo_commands.add_parser("rules", help="print Prometheus alerting rules equivalent to parley's SLO alerts")

    diagnose = commands.add_parser("diagnose", help="rank the distinct failure patterns in log files",
                                   add_help=False)
    diagnose.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    # diagnose and slo read no configuration: they work on any machine, against any log or Prometheus.
    if arguments[:1] == ["diagnose"]:  # its own parser takes its options, wherever they stand
        from parley.observability.diagnose import main as diagnose

        return diagnose(arguments[1:], sys.stdin, sys.stdout)
    args = _parser().parse_args(arguments)
    if args.command == "slo":
        from parley.observability.slo_rules import prometheus_rules

        sys.stdout.write(prometheus_rules())
        return 0
    if args.command == "serve":
        # Exported, so that every worker process reads the same settings.
        for name in ("host", "port", "workers"):
            if getattr(args, name) is not None:
                os.environ[f"PARLEY_{name.upper()}"] = str(getattr(args, name))
    try:
        settings = Settings()
        settings.check()
    except (ValidationError, UnsafeSettings) as exc:
        print(f"parley: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        from parley.server import serve

        return serve(settings)
    from parley.observability.logging import configure_logging

    configure_logging(settings)  # the libraries' lines go through parley's pipeline (and its levels) too
    if args.command == "migrate":
        from parley.commands import migrate

        return asyncio.run(migrate(settings))
    if args.command == "user":
        from parley.commands import create_user

        password = sys.stdin.readline().rstrip("\n") if args.password_stdin else _prompt_password()
        return asyncio.run(create_user(settings, args.email, password, args.display_name, args.admin))
    if args.command == "doctor":
        from parley.commands import doctor

        return asyncio.run(doctor(settings))
    return 2


def _prompt_password() -> str:
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat: ") != first:
        print("parley: the passwords differ", file=sys.stderr)
        raise SystemExit(2)
    return first


if __name__ == "__main__":
    raise SystemExit(main())
