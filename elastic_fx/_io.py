"""Safe file output: every file elastic_fx writes appears whole or not at all, at a plain path.

* ``check_output(path, what)`` refuses, before any work is done, an output that cannot be
  written safely: an empty path, a name longer than the file system allows, a symbolic link
  (elastic_fx never writes through one), an existing directory where a file is wanted (or a
  file where a directory is wanted), a device node / FIFO / socket, a path inside the virtual
  file systems ``/proc``, ``/sys`` and ``/dev``, or a folder that cannot be written.
* ``atomic_write(path, write)`` checks the path, calls ``write(tmp)`` on a temporary path in
  the target's directory and renames it over ``path`` only when ``write`` returned; on any
  failure the temporary file is removed and ``path`` is untouched. The temporary name has a
  fixed length, so any legal target name works; the file's mode follows the umask.
* ``replace_dir(out, fill)`` builds a whole output folder in a fresh temporary folder and
  swaps it in at once (all-or-nothing), under a lock that refuses a second writer.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Type

from .errors import ElasticFxError

#: Folders holding virtual file systems: writing there changes the system, never a file
#: (``/dev/shm`` is ordinary shared memory for files, so it is allowed).
VIRTUAL_ROOTS = ("/proc", "/sys", "/dev")
_FILE_SYSTEMS_UNDER_DEV = ("/dev/shm",)
#: Temporary names: a fixed prefix and suffix around mkstemp's 8 random characters.
_TMP_PREFIX, _TMP_SUFFIX = ".efx-", ".tmp"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output(path: "str | os.PathLike[str]", what: str = "the output",
                 error: Type[ElasticFxError] = ElasticFxError, *, directory: bool = False) -> Path:
    """Refuse an output path that cannot be written safely; return it as a Path.

    ``what`` names the path in messages (the CLI passes its flag, e.g. ``"--out"``);
    ``directory`` says whether a folder (``--out-dir``) or a file is wanted.
    """
    text = os.fspath(path)
    if not str(text).strip():
        kind = "folder" if directory else "file"
        raise error(f"{what} is empty; give a {kind} path, e.g. {'out/' if directory else 'scores.efx'}")
    p = Path(text).expanduser()
    if "\0" in str(p):
        raise error(f"{what} {str(p)!r} contains a NUL character; give a plain path")
    ancestor = _existing_ancestor(p.parent if str(p.parent) else Path("."))
    limit = _name_max(ancestor if ancestor.is_dir() else Path("."))
    for part in p.parts:
        if len(os.fsencode(part)) > limit:
            raise error(f"{what}: the name {part[:40]!r}... is {len(os.fsencode(part))} bytes, longer than the "
                        f"{limit} this file system allows; choose a shorter name")
    if p.is_symlink():
        raise error(f"{what} {p} is a symbolic link (to {os.readlink(p)}); elastic_fx never writes through a link: "
                    "give the real path, or remove the link")
    if p.exists():
        mode = p.stat().st_mode
        if directory and not stat.S_ISDIR(mode):
            raise error(f"{what} {p} exists and is not a directory; give a new or existing folder")
        if not directory and stat.S_ISDIR(mode):
            raise error(f"{what} {p} is a directory, not a file; give a file path, e.g. {p / 'scores.efx'}")
        if not directory and not stat.S_ISREG(mode):
            raise error(f"{what} {p} is a special file (a device, FIFO or socket), not a regular file; elastic_fx "
                        "never replaces one: give a regular file path")
    resolved = str(ancestor.resolve())
    allowed = any(resolved == r or resolved.startswith(r + "/") for r in _FILE_SYSTEMS_UNDER_DEV)
    for root in VIRTUAL_ROOTS:
        if not allowed and (resolved == root or resolved.startswith(root + "/")):
            raise error(f"{what} {p} is inside {root}, a virtual file system, not a place for files; "
                        "choose a path on a disk")
    if not ancestor.is_dir():
        raise error(f"Cannot create the output directory {ancestor} for {what} {p}: it is a file, not a directory; "
                    "choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise error(f"{what} {p}: cannot write to {ancestor} (permission denied); choose another path")
    return p


def _make_parent(parent: Path, error: Type[ElasticFxError]) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create directory {parent}: {e.strerror or e}; choose another output path") from None


def atomic_write(path: "str | os.PathLike[str]", write: Callable[[Path], object],
                 error: Type[ElasticFxError] = ElasticFxError, what: str = "the output") -> Path:
    """Write ``path`` through a temporary file and ``os.replace``; return ``path``.

    Raises ``error`` (an :class:`ElasticFxError` subclass) when ``path`` fails
    :func:`check_output` or its directory cannot be created or written.
    """
    path = check_output(path, what, error)
    parent = path.parent if str(path.parent) else Path(".")
    _make_parent(parent, error)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=parent)
    except OSError as e:
        raise error(f"cannot write to {parent}: {e.strerror or e}; choose another output path") from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a normal file follows the umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return path


# ---------------------------------------------------------------------------- whole folders
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


@contextmanager
def _lock(out: Path, error: Type[ElasticFxError]) -> Iterator[None]:
    """An exclusive lock for writing folder ``out``; a second writer is refused, not queued."""
    digest = hashlib.sha1(os.fsencode(str(out.absolute()))).hexdigest()[:16]
    lock_path = out.parent / f".efx-lock-{digest}"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise error(f"another elastic-fx process is writing {out} right now; wait for it to finish, "
                        "or choose another output folder") from None
        # the holder before us may have removed the file: lock the file that is there now
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(lock_path)
        except OSError:
            pass
        os.close(fd)


def replace_dir(out: "str | os.PathLike[str]", fill: Callable[[Path], object],
                error: Type[ElasticFxError] = ElasticFxError, what: str = "the output folder",
                owned: Optional[Callable[[Path], bool]] = None) -> Path:
    """Build folder ``out`` all-or-nothing: ``fill(tmp)`` writes a fresh temporary folder
    that then takes the place of ``out`` (the old one is removed). On any failure ``out``
    is untouched.

    ``owned(out)``, when given, says whether an existing, non-empty ``out`` holds only what
    an earlier run wrote; a folder holding anything else is refused, never replaced.
    """
    out = check_output(out, what, error, directory=True)
    if out.is_dir() and any(out.iterdir()) and not (owned and owned(out)):
        raise error(f"{what} {out} already holds files that elastic-fx did not write; give an empty or new folder")
    parent = out.parent if str(out.parent) else Path(".")
    _make_parent(parent, error)
    with _lock(out, error):
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            fill(tmp)
            if not out.exists():
                os.rename(tmp, out)
                return out
            if not _exchange(tmp, out):  # no atomic swap here: move aside, then in
                old = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX, dir=parent))
                os.rename(out, old / "old")
                os.rename(tmp, out)
                tmp = old
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
