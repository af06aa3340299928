"""The one exception type for mistakes a user can fix (bad config, missing file, wrong flag).

The CLI prints these as a single `error: ...` line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, worded so they can fix it without reading our code."""
