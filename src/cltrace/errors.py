"""The one exception type a user can cause; the CLI prints its message as a single line."""


class CltraceError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""
