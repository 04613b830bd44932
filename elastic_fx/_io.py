"""Atomic file output: every file elastic_fx writes appears whole or not at all.

``atomic_write(path, write)`` calls ``write(tmp)`` on a temporary path in the target's
directory and renames it over ``path`` only when ``write`` returned; on any failure
the temporary file is removed and ``path`` is untouched. It touches nothing else.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Type

from .errors import ElasticFxError


def atomic_write(path: "str | os.PathLike[str]", write: Callable[[Path], object],
                 error: Type[ElasticFxError] = ElasticFxError) -> Path:
    """Write ``path`` through a temporary file and ``os.replace``; return ``path``.

    Raises ``error`` (an :class:`ElasticFxError` subclass, naming the directory) when the
    directory cannot be created or written.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create directory {parent}: {e}; choose another output path") from e
    if not os.access(parent, os.W_OK):
        raise error(f"cannot write to {parent}: permission denied; choose another output path")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
