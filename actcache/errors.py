"""User-facing errors.

An :class:`ActcacheError` means the input was wrong (a bad path, an unknown hook, a store
that already exists...). The CLI prints its message on one line and exits non-zero, with
no traceback; anything else is a bug and keeps its traceback.
"""


class ActcacheError(Exception):
    """A problem with the user's input, with a message that names the fix."""


class StoreCorruptError(ActcacheError):
    """Bytes of a store that cannot be trusted: a chunk whose checksum does not match or that does
    not decode, or metadata (``zarr.json``) that does not parse. The message names the object and
    the repair; nothing read from it is ever returned."""
