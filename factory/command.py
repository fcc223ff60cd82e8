"""How every entry point (`factory`, each `python -m` module's `main`) runs its click command:
a user error is one line on stderr and exit status 2. Only entry points import this."""

from __future__ import annotations

import sys

import click

from factory.errors import FactoryError


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
