"""The error a user sees as one line."""


class FactoryError(Exception):
    """Bad input or an unusable environment, reported to the user in one line."""


class RunFailure(FactoryError):
    """A run that failed at work (a stage that kept raising, an output that cannot be written):
    one line too, but its folder and log stay, for the traceback and the rerun."""


class StoreError(ValueError):
    """An output folder that cannot be used for this run."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM: the command stops its Ray work and exits 130 with this one line. A
    BaseException, as KeyboardInterrupt, so that no `except Exception` swallows it, but not a
    KeyboardInterrupt, which click would turn into an Abort and a blank line."""

    def __init__(self, message: str = "interrupted; rerun the same command to finish") -> None:
        super().__init__(message)


def interruption(e: BaseException | None) -> Interrupted | None:
    """The Ctrl-C/SIGTERM `Interrupted` that `e` is or was raised from, else None. The signal
    handler raises it wherever the main thread is; inside Ray's compiled code (`ray.wait`) it
    comes out as a SystemError ("returned a result with an exception set") caused by it."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, Interrupted):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
