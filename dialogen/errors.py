"""The one exception type a user sees: a mistake in their input, reported on one line."""


class UserError(Exception):
    """Bad input (a path, a flag, a data file). The CLI prints it on one line and exits 2."""
