"""Crash-safe file writing shared by the runtime and the pruning package."""
from __future__ import annotations

import os
import tempfile
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
    into place, each existing file kept under a hard link until every rename has succeeded, so
    a failure or an interrupt (an exception, Ctrl-C) at any point leaves every existing file as
    it was and no new one. Only a hard kill of the process during the short loop of renames
    could leave some files new and some old (and a ``.NAME.*.old`` link beside them)."""
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
    backups: list[str] = []
    done: list[tuple[Path, str | None]] = []  # renamed into place, with the old file's link
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
            if path.exists():
                backup = tempfile.mktemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
                try:
                    os.link(path, backup)
                except FileExistsError:
                    raise
                except OSError:  # a file system without hard links: move it aside instead
                    os.replace(path, backup)
                backups.append(backup)
            os.replace(tmp, path)
            done.append((path, backup))
    except BaseException:
        for path, backup in reversed(done):  # put back what the renames replaced
            try:
                if backup is None:
                    os.unlink(path)
                else:
                    os.replace(backup, path)
            except OSError:
                pass
        for tmp in temps + backups:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    for backup in backups:
        try:
            os.unlink(backup)
        except FileNotFoundError:
            pass
    return paths
