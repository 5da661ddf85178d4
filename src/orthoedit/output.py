"""Never a partial output at the final path: write beside the target, rename at the end."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import BadInputError


def check_target(target: Path, source: Path | None, overwrite: bool) -> Path:
    """Validate an output folder before any work is done; returns it resolved."""
    target = Path(target).expanduser().resolve()
    if source is not None:
        source = Path(source).resolve()
        if target == source or source in target.parents:
            raise BadInputError(f"output {target} is the source folder or inside it.")
        if target in source.parents:
            raise BadInputError(f"output {target} contains the source folder {source}.")
    if target.exists() and not overwrite:
        raise BadInputError(f"output {target} already exists; pass --overwrite to replace it.")
    if target.exists() and not target.is_dir():
        raise BadInputError(f"output {target} exists and is not a folder.")
    return target


@contextlib.contextmanager
def staged_output(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target``.

    On any error the temporary folder is removed and ``target`` is left as it was.
    """
    parent = target.parent
    created = next((p for p in reversed([parent, *parent.parents]) if not p.exists()), None)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.orthoedit-", dir=parent))
        # mkdtemp makes 0700 folders; a checkpoint should be readable as the umask allows.
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)
    except OSError as err:
        _remove(created)
        raise _os_error(err, parent) from err
    old = None
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except BaseException as err:
        if old is not None and not target.exists():
            os.replace(old / target.name, target)  # put the previous output back
        _remove(old)
        _remove(tmp)
        _remove(created)
        if isinstance(err, OSError):
            raise _os_error(err, target) from err
        raise
    _remove(old)


def _remove(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def _os_error(err: OSError, where: Path) -> BadInputError:
    if err.errno == errno.ENOSPC:
        return BadInputError(f"disk full while writing {where}; nothing was written.")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BadInputError(f"no permission to write {where}; choose another --out.")
    return BadInputError(f"cannot write {where}: {err.strerror or err}.")
