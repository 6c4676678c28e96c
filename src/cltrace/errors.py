"""The exceptions a user can cause; the CLI prints their message as a single line.

Messages speak in library terms (parameter and field names); only the CLI names its flags: a `SettingError`
says which settings are at fault, and the CLI adds the flags that set them.
"""


class CltraceError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class SettingError(CltraceError):
    """A bad or conflicting setting. `settings` names the parameters (config fields) at fault."""

    def __init__(self, message: str, settings: tuple[str, ...] = ()):
        super().__init__(message)
        self.settings = tuple(settings)
