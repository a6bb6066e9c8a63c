"""Errors a user can act on.  The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input, bad configuration, a missing path: shown as one line, exit code 2."""

    exit_code = 2


class NotYetAvailable(UserError):
    """A contract command whose engine is not built in this version."""
