"""How every entry point (`factory`, each `python -m` module's `main`) runs its click command:
a user error is one line on stderr and exit status 2; Ctrl-C or SIGTERM stops the command's Ray
work and is one line too, exit status 130. Only entry points import this."""

from __future__ import annotations

import signal
import sys

import click

from factory.errors import FactoryError, Interrupted, interruption


def _interrupt(signum, frame) -> None:
    raise Interrupted()


def stop_ray() -> None:
    """Shut down this process's Ray (a local one with all its processes), undisturbed by a
    second Ctrl-C; nothing if Ray was never started."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    ray.shutdown()


def run_command(command: click.Command, argv: list[str] | None, prog_name: str) -> None:
    """Run a click command; a user error (bad option, FactoryError) is one line, exit 2; an
    interruption (Ctrl-C, SIGTERM) stops Ray and says what is done in one line, exit 130."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except (click.ClickException, FactoryError) as e:
        msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
        click.echo(f"{prog_name}: error: {msg}", err=True)
        sys.exit(2)
    except (Interrupted, SystemError) as e:
        interrupted = interruption(e)
        if interrupted is None:
            raise
        stop_ray()
        click.echo(f"{prog_name}: {interrupted}", err=True)
        sys.exit(130)
    except click.exceptions.Abort:  # Ctrl-C at one of click's own prompts
        sys.exit(130)
