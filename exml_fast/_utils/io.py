"""Atomic file writes: readers see the old file or the complete new one, never a part; and an advisory lock
for files that several processes update."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Callable
from typing import IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Calls ``write(f)`` on a temporary file beside ``path``, then renames it onto ``path``.

    The temporary file is fsynced before the rename and removed if ``write``
    raises, so an interrupted job leaves either nothing or the previous
    version at ``path`` (a process killed outright can leave the temporary
    file, named by :func:`temporary_files_of`, which never reads as ``path``).
    Parent folders are created. An OS error (a full disk, a read-only folder)
    is raised as an OSError of the same errno whose message names ``path``.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    # Not tempfile.mkstemp: its 0600 mode would survive the rename.
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileExistsError) and e.errno is not None:
            raise OSError(e.errno, f"could not write {path!r} ({e.strerror or e}); any earlier version of it "
                                   "is intact", path) from e
        raise


@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """Holds an exclusive advisory lock (``flock``) on the file ``path`` for the ``with`` block, waiting for
    any other process that holds it. For read-modify-write updates of a file replaced by :func:`atomic_write`
    (whose inode changes at every write, so it cannot carry the lock itself): lock a fixed file beside it.
    ``path`` and its folder are created if missing and kept afterwards; the lock ends with the block, or
    with the process."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Creates ``folder`` and writes and removes a one-byte temporary file in it, so a job whose first write
    there comes after hours of work fails at once on a read-only or forbidden folder (a full disk can still
    come later: every write is atomic, see :func:`atomic_write`). Raises an OSError of the same errno whose
    message starts with ``what`` and names the folder."""
    folder = os.fspath(folder)
    probe = os.path.join(folder, f".write-probe.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "xb") as f:
            f.write(b"\0")
        os.unlink(probe)
    except OSError as e:
        try:
            os.unlink(probe)
        except OSError:
            pass
        raise OSError(e.errno, f"{what}: cannot write into {folder!r} ({e.strerror or e})", folder) from e


def temporary_files_of(folder: str | os.PathLike, name_prefix: str = "") -> list[str]:
    """The temporary files :func:`atomic_write` leaves in ``folder`` when its process is killed
    mid-write (of files whose names start with ``name_prefix``): safe to delete when no writer
    of them is running."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.startswith("." + name_prefix) and n.endswith(".tmp"))


def load_torch_bytes(data: bytes, *, where: str, what: str, error: type[Exception] = ValueError):
    """``torch.load(weights_only=True)`` of a file's bytes, with one error type and a readable message.

    ``where`` names the file and ``what`` the kind expected ("checkpoint",
    "buffer file"); any failure — not torch's zip format, truncated, or
    holding Python objects weights-only loading refuses (code is never
    unpickled) — raises ``error(f"{where}: not a readable {what}...")``.
    """
    import io
    import pickle
    import re
    import zipfile

    import torch

    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise error(f"{where}: not a readable {what} (not a torch.save zip archive: corrupt or truncated file, "
                    f"or another kind of file; {len(data)} bytes)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        hint = f" (e.g. {found.group(1)})" if found else ""
        raise error(f"{where}: not a readable {what}: it holds Python objects{hint} that weights_only loading "
                    "refuses (code is never unpickled)") from e
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"{where}: not a readable {what} (corrupt or truncated file?): {first}") from e


def load_torch_file(path: str | os.PathLike, *, what: str, error: type[Exception] = ValueError):
    """:func:`load_torch_bytes` of the file at ``path`` (FileNotFoundError when there is none)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist or is not a file")
    with open(path, "rb") as f:
        return load_torch_bytes(f.read(), where=path, what=what, error=error)
