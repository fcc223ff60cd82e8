"""The error a user sees as one line, and how every command reports it."""

from __future__ import annotations

import sys

import click


class FactoryError(Exception):
    """Bad input or an unusable environment, reported to the user in one line."""


def run_command(command: click.Command, argv: list[str] | None, prog_name: str) -> None:
    """Run a click command; a user error (bad option, FactoryError) is one line, exit 2."""
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except (click.ClickException, FactoryError) as e:
        msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
        click.echo(f"{prog_name}: error: {msg}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
