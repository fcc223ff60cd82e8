"""The error a user sees as one line."""


class FactoryError(Exception):
    """Bad input or an unusable environment, reported to the user in one line."""
