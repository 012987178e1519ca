"""One base class for every problem the user can act on.

A `StudioError` carries the message, the setting it concerns (``field``, when one does), the bare
reason (``why``, the message without its ``source: field:`` prefix) and a ``hint`` (what to do about
it). The command line catches it once (`cli.main`: the message, exit code 2) and so does the browser
app (`ui.common.safe`: the message in a notice); anything else is a bug and keeps its traceback.
Each area has its own subclass (`ConfigError`, `runs.RunError`, `data.DataError`, ...), so code can
still catch one kind.
"""

from __future__ import annotations


class StudioError(Exception):
    """A problem with the user's input, files or machine that the message explains."""

    def __init__(self, message: str, field: str | None = None, hint: str | None = None, why: str | None = None):
        super().__init__(message)
        self.field = field
        self.hint = hint
        self.why = why or message

    def user_text(self) -> str:
        """The message, with the hint after it when there is one."""
        return f"{self} ({self.hint})" if self.hint and self.hint not in str(self) else str(self)


class ConfigError(StudioError):
    """A setting is unknown or has a value it cannot take (the message names the source and the field)."""

    @classmethod
    def at(cls, source: str, field: str, why: str, hint: str | None = None) -> "ConfigError":
        return cls(f"{source}: {field}: {why}", field=field, hint=hint, why=why)


class TrainingError(StudioError):
    """A run could not be set up or continued (the model, the adapter, the data it needs)."""
