"""The one base of the errors a user can fix.

``SFTError`` marks a problem in what the user gave (config, flags, files, data, environment),
told with the fix. The command-line tools catch ``SFTError`` only: they print the message and
exit non-zero. Any other exception is a bug in this code and keeps its traceback.

Each error class keeps a built-in base too (``ValueError``, ``RuntimeError``, ...) so that
``except ValueError`` written against the library still works.
"""

from __future__ import annotations


class SFTError(Exception):
    """A problem the user can fix; the message says which and how."""


class InputError(SFTError, ValueError):
    """Bad input with no more specific class: a file, a flag, a value."""


class MissingInputError(SFTError, FileNotFoundError):
    """A file or folder the user named does not exist."""
