"""The one base class of every error a user can cause (a bad file, key, value or argument).

The CLI prints a PipelineError as one line, `error: <message>`, and exits with code 2; the message
names the file, key or value and the reason. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class PipelineError(Exception):
    """A problem with the user's input, explained in the message."""


class ConfigError(PipelineError, ValueError):
    """A setting, option or argument with a bad value; the message names the key."""


class MissingFile(PipelineError, FileNotFoundError):
    """A file the command needs does not exist; the message says which command makes it."""
