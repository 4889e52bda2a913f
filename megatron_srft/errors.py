"""The errors a user can cause and fix. The CLI prints them as one line naming the file or field, exit code 2.

Every module raises these instead of importing the command line: the arrows point from commands to the rest,
never back.
"""

from __future__ import annotations


class SrftError(Exception):
    """Base of the errors the user can fix (bad config, data, checkpoint, arguments)."""


class ConfigError(SrftError, ValueError):
    """A bad config value; the message is one line naming the field (and file) and what was expected."""


class UserError(SrftError):
    """An error in the user's input (arguments, files); printed as one line, exit code 2."""


class CheckpointError(UserError):
    """A checkpoint or converted directory that cannot be read safely or completely (a file that is missing,
    truncated, fails its checksum, or holds something other than what the format allows); one line naming the file."""


def first_line(exc: BaseException, limit: int | None = None, *, empty: str | None = None) -> str:
    """How a library's error is quoted in our one-line messages: the first line of ``str(exc)`` (stripped), cut to
    ``limit`` characters. An exception with no text gives ``empty``, or its class name when ``empty`` is None."""
    text = str(exc).strip()
    if not text:
        return exc.__class__.__name__ if empty is None else empty
    return text.splitlines()[0][:limit]
