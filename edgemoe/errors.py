"""Errors that are the user's to fix: the CLI prints them as one `error:` line, exit status 2."""


class UserError(Exception):
    """A mistake in the input (a path, a file, an option); never a bug in edgemoe."""
