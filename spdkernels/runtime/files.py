"""Output files of the runtime's commands: checked before the work that fills them, written whole or not at all.

A file is written to a temporary name beside it and renamed over the final name (``os.replace`` is atomic on
POSIX and Windows), so an interrupted run leaves the previous file or none, never a truncated one that a later
run would trust (the training text and anchor-state caches of ``train-pdm`` are read back by every later run). The
temporary file's data reaches the disk (``fsync``) before the rename, and the rename before the call returns (the
folder's ``fsync`` where the system allows it), so a power loss does not leave a renamed but empty file either."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def check_output_file(path: PathLike, arg: str) -> Path:
    """Refuse (``ValueError`` naming ``arg``) an output path that cannot be written: a folder, or one whose
    parent is a file or cannot be created. Leaves nothing behind (it creates and removes one probe entry in the
    nearest existing folder): missing parent folders are made when the file is written (:func:`write_atomic`),
    so a run refused or failed later leaves no empty folders behind."""
    p = _path(path, arg)
    if p.is_dir():
        raise ValueError(f"{arg}: {p} is a folder, expected a file path")
    _check_folder(p.parent, arg)
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{arg}: {p} is not writable")
    return p


def check_output_folder(path: PathLike, arg: str) -> Path:
    """Like :func:`check_output_file` for a folder the command writes into (made by its first write)."""
    p = _path(path, arg)
    _check_folder(p, arg)
    return p


def _path(path: PathLike, arg: str) -> Path:
    if not str(path).strip():  # Path("") is the current folder: never what an empty argument meant
        raise ValueError(f"{arg}: empty path")
    return Path(path)


def _check_folder(d: Path, arg: str) -> None:
    # the nearest existing path on the way up must be a folder this process may create entries in
    p = d
    while not p.exists() and p.parent != p:
        if os.path.lexists(p):  # a link whose target is gone: creating the folder there would fail after the run
            raise ValueError(f"{arg}: {p} is a link to a missing target")
        p = p.parent
    if not p.is_dir():
        raise ValueError(f"{arg}: {p} is a file, expected a folder")
    why = "" if p == d else f" (cannot create {d})"
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"{arg}: the folder {p} is not writable" + why)
    try:  # os.access answers yes to root everywhere (/sys, /proc, ...): create and remove an entry to be sure
        os.rmdir(tempfile.mkdtemp(prefix=".spdkernels-probe-", dir=p))
    except OSError as e:
        raise ValueError(f"{arg}: the folder {p} is not writable ({e.strerror or e})" + why) from None


def write_atomic(path: PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path`` in one step; on any
    error the temporary file is removed and ``path`` is left as it was."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what a plain open() would have given
    try:
        write(tmp)
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, p)
        _fsync(p.parent, getattr(os, "O_DIRECTORY", os.O_RDONLY), optional=True)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p


def _fsync(path: PathLike, flags: int, optional: bool = False) -> None:
    """``fsync`` of a file (its data) or of a folder (its entries; ``optional``: some systems refuse that)."""
    try:
        fd = os.open(path, flags)
    except OSError:
        if optional:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not optional:
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: PathLike, text: str) -> Path:
    """:func:`write_atomic` for text (UTF-8)."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_figure_atomic(fig, path: PathLike, dpi: int = 110) -> Path:
    """:func:`write_atomic` for a matplotlib figure (the format from the file name's suffix, PNG without one)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
