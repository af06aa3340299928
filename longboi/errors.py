"""The one exception type for mistakes a user can fix (bad config, missing file, wrong flag).

The CLI prints these as a single `error: ...` line and exits non-zero; anything else is a bug and
keeps its traceback.
"""

import tempfile
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input, worded so they can fix it without reading our code."""


def check_output_location(path: str | Path, what: str = "output") -> None:
    """Fail before any work when `path` cannot be written: its parent directory is created (the command
    would create it anyway) and a probe file written and removed there, so a missing or read-only place,
    or a file where a directory should be, is one line naming the path and the reason, not a traceback
    after minutes of work."""
    target = Path(path).absolute()
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{target.name}.probe-"):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"{what} {path}: cannot write in {parent}: {reason}") from e
