"""The one exception type that means "the user gave us something we cannot use".

The CLI prints it as a single `error: ...` line with exit code 2 and no traceback, so its
message must say what is wrong, where, and how to fix it.
"""


class InputError(Exception):
    """Bad input (a missing file, an unknown name, a malformed option): exit code 2."""
