"""Atomic file writes: a reader sees a file's old content or its new one, never a part.

The one home of the pattern for text files (the checkpoint tracker and completeness marker of
:mod:`vitos_verl.trainer.checkpoint`, the data preparation's ``summary.json``, the learning
report). It imports nothing of this package, so every layer and ``data_prep`` may use it.
"""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old content or the new, never part.

    Writes ``text`` to a temporary file in the same folder (``.<name>.tmp-<pid>``: the rename stays
    on one file system and two processes never share it), flushes it to disk (``fsync``), renames
    it over ``path`` (``os.replace``, atomic on POSIX), then ``fsync``-s the folder so
    the rename itself survives a power loss on POSIX file systems (skipped where a folder cannot
    be opened). A process killed before the rename leaves ``path`` as it was (and possibly the
    temporary file).

    Raises:
        OSError: the folder is missing or not writable, the disk is full, ``path`` is a folder, ...;
            ``path`` is then untouched and the temporary file is removed.
        UnicodeEncodeError: ``text`` that ``encoding`` cannot hold (likewise).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
