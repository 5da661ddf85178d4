"""Outputs: never a partial output at the final path, and never a loss of what orthoedit did
not write.

- A folder output is written beside the target and renamed into place at the end
  (``staged_output``); it carries a marker file (``MARKER``), and ``--overwrite`` replaces only
  a folder that has one (or an empty one).
- No output may be, contain or lie inside anything the command reads (``inputs_of``), the
  working folder or one of its parents, or the home folder.
- A file output is written to a temporary file beside it and renamed (``write_file``; a big
  one in a staging folder, ``staged_file``).
- Staging folders are named after the process that made them, so a later run of the same
  target removes those of processes that no longer exist (a SIGKILL leaves them behind).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel

from . import __version__
from .errors import BadInputError

MARKER = ".orthoedit-output.json"
# Config fields that name a model or prompts by a string (a local path or a Hub id).
_READ_STR_FIELDS = (
    "model",
    "source",
    "base",
    "edited",
    "harmful",
    "harmless",
    "confirm_harmful",
    "confirm_harmless",
    "prompts",
)
_WRITE_FIELDS = ("out", "report", "offload_folder")


def inputs_of(cfg: BaseModel) -> list[Path]:
    """The local files and folders a stage's config reads: every path field but the outputs,
    and the model / prompt fields that name something on disk (Hub ids are not paths)."""
    found: list[Path] = []
    for name in type(cfg).model_fields:
        if name in _WRITE_FIELDS:
            continue
        value = getattr(cfg, name)
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if isinstance(v, Path) or (name in _READ_STR_FIELDS and isinstance(v, str)):
                path = Path(v).expanduser()
                if path.exists():
                    found.append(path.resolve())
        if name == "judge" and isinstance(value, str) and value.startswith("hf:"):
            path = Path(value[3:]).expanduser()
            if path.exists():
                found.append(path.resolve())
    return found


def check_apart(target: Path, reads: Iterable[Path | str | None], option: str) -> None:
    """Refuse a target that is, contains or lies in an input, or holds the working folder."""
    for read in reads:
        if read is None:
            continue
        read = Path(read).expanduser().resolve()
        if target == read:
            raise BadInputError(f"{option} {target} is an input of this command; choose another.")
        if read in target.parents:
            raise BadInputError(
                f"{option} {target} is inside {read}, which this command reads; choose a path "
                "outside it."
            )
        if target in read.parents:
            raise BadInputError(f"{option} {target} contains {read}, which this command reads.")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise BadInputError(
            f"{option} {target} is the working folder or holds it; choose a new folder."
        )
    home = Path.home().resolve()
    if target == home or target in home.parents:
        raise BadInputError(f"{option} {target} is the home folder or holds it.")


def check_target(
    target: Path,
    reads: Iterable[Path | str | None] = (),
    overwrite: bool = False,
    option: str = "--out",
) -> Path:
    """Validate an output folder before any work is done; returns it resolved."""
    target = Path(target).expanduser().resolve()
    check_apart(target, reads, option)
    if not target.exists():
        return target
    if not overwrite:
        raise BadInputError(f"{option} {target} already exists; pass --overwrite to replace it.")
    if not target.is_dir():
        raise BadInputError(f"{option} {target} exists and is not a folder.")
    if not (target / MARKER).is_file() and any(target.iterdir()):
        raise BadInputError(
            f"{option} {target} was not written by orthoedit (it has no {MARKER}); --overwrite "
            "replaces only orthoedit's outputs: remove it yourself or choose another folder."
        )
    return target


def check_file_target(
    target: Path,
    reads: Iterable[Path | str | None] = (),
    overwrite: bool = False,
    option: str = "--report",
) -> Path:
    """Validate an output file before any work is done; returns it resolved."""
    target = Path(target).expanduser().resolve()
    check_apart(target, reads, option)
    if target.exists() and not target.is_file():
        raise BadInputError(f"{option} {target} exists and is not a file.")
    if target.exists() and not overwrite:
        raise BadInputError(f"{option} {target} already exists; pass --overwrite to replace it.")
    return target


def write_file(target: Path, text: str) -> Path:
    """Write ``text`` to ``target`` at once: a temporary file beside it, then a rename."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise _os_error(err, target) from err
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, target)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _os_error(err, target) from err
        raise
    return target


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> None:
    """Remove the staging folders of ``target`` left by processes that no longer run; a
    previous output set aside by one of them (killed between two renames) is put back."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(orthoedit|old)-(\d+)-")
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if not match or not entry.is_dir() or _alive(int(match.group(2))):
            continue
        kept = entry / target.name
        if match.group(1) == "old" and kept.exists() and not target.exists():
            os.replace(kept, target)
        shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def staged_output(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target``, with the
    marker that lets a later ``--overwrite`` replace it.

    On any error (an interrupt or SIGTERM included) the temporary folder is removed and
    ``target`` is left as it was.
    """
    parent = target.parent
    created = next((p for p in reversed([parent, *parent.parents]) if not p.exists()), None)
    pid = os.getpid()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.orthoedit-{pid}-", dir=parent))
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
        marker = {"written_by": "orthoedit", "version": __version__}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n")
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{pid}-", dir=parent))
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


@contextlib.contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """Yield a path in a staging folder beside ``target`` (named as ``staged_output``'s, so a
    killed run's is cleaned up later); on success the file becomes ``target``, replacing the
    file there. On any error nothing is left and ``target`` is as it was."""
    parent = target.parent
    created = next((p for p in reversed([parent, *parent.parents]) if not p.exists()), None)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_stale(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.orthoedit-{os.getpid()}-", dir=parent))
    except OSError as err:
        _remove(created)
        raise _os_error(err, parent) from err
    try:
        yield tmp / target.name
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp / target.name, 0o666 & ~mask)
        os.replace(tmp / target.name, target)
    except BaseException as err:
        _remove(tmp)
        _remove(created)
        if isinstance(err, OSError):
            raise _os_error(err, target) from err
        raise
    _remove(tmp)


def remove_output(folder: Path) -> bool:
    """Remove ``folder`` if orthoedit wrote it (it carries ``MARKER``); a folder without the
    marker is left alone. Whether it is gone."""
    if (folder / MARKER).is_file():
        shutil.rmtree(folder)
    return not folder.exists()


def _remove(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def _os_error(err: OSError, where: Path) -> BadInputError:
    if err.errno == errno.ENOSPC:
        return BadInputError(f"disk full while writing {where}; nothing was written.")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BadInputError(f"no permission to write {where}; choose another --out.")
    return BadInputError(f"cannot write {where}: {err.strerror or err}.")
