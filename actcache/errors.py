"""User-facing errors.

An :class:`ActcacheError` means the input was wrong (a bad path, an unknown hook, a store
that already exists...). The CLI prints its message on one line and exits non-zero, with
no traceback; anything else is a bug and keeps its traceback.
"""


class ActcacheError(Exception):
    """A problem with the user's input, with a message that names the fix."""
