"""The error a user sees as one line."""


class FactoryError(Exception):
    """Bad input or an unusable environment, reported to the user in one line."""


class RunFailure(FactoryError):
    """A run that failed at work (a stage that kept raising, an output that cannot be written):
    one line too, but its folder and log stay, for the traceback and the rerun."""
