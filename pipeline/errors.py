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


class MachineFault(PipelineError, OSError):
    """The machine refused a write (no space, read-only, permission, a folder in the way); the
    message names the path and what to do."""


ADVICE = {  # errno -> what it means for the user, and what to do
    28: "no space left on its device: free space there or write elsewhere",
    122: "disk quota exceeded: free space there or write elsewhere",
    30: "the file system is read-only: write to a writable folder",
    13: "permission denied: write to a folder you may write to",
    1: "operation not permitted: write to a folder you may write to",
    21: "it is a folder where a file is expected: give a file path",
    20: "a file is in the way where a folder is expected: remove it or write elsewhere",
}


def explain_os_error(e: OSError) -> str | None:
    """One line for an OS refusal to write (including h5py's, which carry the errno in the message),
    or None for other OS errors (those keep their traceback)."""
    import re
    code, name = e.errno, e.filename
    if code is None:   # h5py: "Unable to ... (unable to open file: name = 'x', errno = 30, ...)"
        m = re.search(r"errno = (\d+)", str(e))
        code = int(m.group(1)) if m else None
        n = re.search(r"name = '([^']*)'", str(e))
        name = n.group(1) if n else None
    if code not in ADVICE:
        return None
    return f"{name or 'an output'}: {ADVICE[code]}"
