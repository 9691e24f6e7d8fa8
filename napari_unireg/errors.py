"""Errors the user can fix: the CLI and the GUI show their message, never a traceback."""


class UserError(ValueError):
    """Bad input, missing file, unavailable device, ...: a one-line message naming the problem."""


class Cancelled(Exception):
    """Raised inside a computation when the caller's ``should_stop()`` returned True (not an error)."""
