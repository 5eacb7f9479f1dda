"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class CinematicError(Exception):
    """A problem with the user's input: a bad path, format, config or argument. The message is one line."""
