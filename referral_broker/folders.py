"""Folders this package makes for itself: private to the user running it.

``Path.mkdir(parents=True, mode=0o700)`` applies the mode to the last folder only; the ones
above it get the umask's default (0755 under the usual 022). So the first command on a fresh
machine used to make the data folder (``~/.local/share/referral-broker``) open to others, and
the inbox then warned about a folder this package had made itself. The XDG base directory
specification asks the same as this module does: a missing folder is created 0700.

A folder that already exists is never changed here: the user may have chosen its mode.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PRIVATE = 0o700


def private_folder(path: str | os.PathLike[str]) -> Path:
    """``path`` as a folder, it and every missing folder above it created 0700 (whatever the
    umask); existing folders are left as they are. Returns ``path`` as a :class:`Path`."""
    folder = Path(path)
    missing: list[Path] = []
    at = folder
    while not at.exists():
        if at.parent == at:
            break
        missing.append(at)
        at = at.parent
    for made in reversed(missing):
        try:
            os.mkdir(made, PRIVATE)
        except FileExistsError:
            continue  # another process made it first: it is theirs to have set
        with contextlib.suppress(OSError):
            os.chmod(made, PRIVATE)  # mkdir's mode is masked by the umask
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    return folder
