"""The one exception type users see."""

from __future__ import annotations


class VLIError(Exception):
    """A problem with the user's input (path, file, argument, upload), with a readable message.

    The CLI and the dashboard print the message alone, never a traceback.
    """
