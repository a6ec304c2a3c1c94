"""The one exception type users see."""

from __future__ import annotations


class VLIError(Exception):
    """A problem with the user's input (path, file, argument, upload), with a readable message.

    The CLI and the dashboard print the message alone, never a traceback.
    """


def error_line(error: BaseException) -> str:
    """One line naming an error: its type and the first line of its message (for reports and the UI)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
