"""Crash-safe file writing shared by the runtime and the pruning package."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence


def _umask() -> int:
    """The process umask: from /proc on Linux (reading it there changes nothing), else by
    setting and restoring it (briefly process-wide)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], object]) -> Path:
    """Call ``write_fn(tmp_path)`` on a temporary file in ``path``'s folder, then rename it
    onto ``path``: an interrupted or failed write leaves no partial file and never clobbers an
    existing one."""
    return atomic_write_all([(path, write_fn)])[0]


def atomic_write_all(writes: Sequence[tuple[str | os.PathLike, Callable[[str], object]]]) -> list[Path]:
    """:func:`atomic_write` for a set of files that belong together (a run's outputs): every
    file is written to its temporary first, and only when all are written are they renamed
    into place, each existing file kept under a backup name (a hard link, or the file moved
    aside where the file system has none) until every rename has succeeded; if one fails, or an
    exception or Ctrl-C comes in between, the backups are put back and the new files removed,
    so every existing file is as it was and no new one is left. A backup that cannot be put
    back is kept and named in the error. Only a hard kill of the process during the short
    loop of renames could leave some files new and some old (and ``.NAME.*.old`` backups)."""
    paths = [Path(p) for p, _ in writes]
    for path in paths:
        parent = path.parent
        if not parent.exists():
            raise FileNotFoundError(f"output folder does not exist: {parent}")
        if not os.access(parent, os.W_OK):
            raise PermissionError(f"output folder is not writable: {parent}")
        if path.is_dir():
            raise IsADirectoryError(f"output path is a folder, not a file: {path}")
    temps: list[str] = []
    # (path, its temporary, its backup or None), appended before the path is touched
    started: list[tuple[Path, str, str | None]] = []
    try:
        for path, (_, write_fn) in zip(paths, writes):
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            temps.append(tmp)
            write_fn(tmp)
            # mkstemp makes the file 0600; the result gets the mode a plain open() would give it
            os.chmod(tmp, 0o666 & ~_umask())
        for tmp, path in zip(temps, paths):
            backup = None
            if os.path.lexists(path):
                backup = tempfile.mktemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
            started.append((path, tmp, backup))
            if backup is not None:
                try:
                    if path.is_symlink():
                        raise OSError("a link is moved aside, not hard-linked")
                    os.link(path, backup)
                except FileExistsError:
                    raise
                except OSError:  # no hard links here (or a symbolic link): move it aside
                    os.replace(path, backup)
            os.replace(tmp, path)
    except BaseException as e:
        kept = []
        for path, tmp, backup in reversed(started):  # put back what the renames replaced
            try:
                if backup is not None and os.path.lexists(backup):
                    if os.path.lexists(path) and os.path.samestat(os.lstat(path), os.lstat(backup)):
                        os.unlink(backup)  # not renamed over yet: path is the old file (rename would do nothing)
                    else:
                        os.replace(backup, path)
                elif backup is None and not os.path.lexists(tmp):  # renamed in, and new
                    os.unlink(path)
            except OSError:
                if backup is not None and os.path.lexists(backup):
                    kept.append(f"{backup} (the previous {path})")
        for tmp in temps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if kept:
            note = "previous files that could not be put back are kept as: " + ", ".join(kept)
            if hasattr(e, "add_note"):  # Python 3.11+
                e.add_note(note)
            else:
                warnings.warn(note, stacklevel=2)
        raise
    for _, _, backup in started:
        if backup is not None:
            try:
                os.unlink(backup)
            except FileNotFoundError:
                pass
    return paths
