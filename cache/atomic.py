"""Atomic writes of files and folders: a crash or an error mid-write leaves the previous one, never half of it."""

import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; write it in the block. On success it is flushed to
    disk and renamed onto `target` (one atomic step); on any error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent, f".{target.name}-", TMP_SUFFIX)
    tmp = target.parent / f".{target.name}-{unique_part()}{TMP_SUFFIX}"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask's mode, like any written file
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def building_folder(target: Path) -> Iterator[Path]:
    """Yield a new empty folder beside `target` to build in. On success it replaces `target` whole
    (an existing one is moved aside, then removed); on any error it is removed and `target` stays as
    it was. Callers decide beforehand whether `target` may be replaced at all."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for kind in ("tmp", "old"):  # what killed builds left
        remove_stale(target.parent, f".{target.name}.{kind}-")
    unique = unique_part()
    building = target.parent / f".{target.name}.tmp-{unique}"
    building.mkdir()
    try:
        yield building
        old = target.parent / f".{target.name}.old-{unique}"
        if target.exists():
            os.rename(target, old)
        os.rename(building, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(building, ignore_errors=True)


class NotOurs(ValueError):
    """The place a command would write its file holds something iqa did not write there."""


def replaceable_file(path: Path, ours: Callable[[Path], bool], option: str) -> Path:
    """`path` if a command may write its file there: nothing there yet (missing folders are made), or a file
    an earlier run of it wrote (`ours` recognises it by what it writes inside). A folder, a link or
    anyone else's file is refused (NotOurs), before anything is written."""
    path = Path(path)
    if path.is_dir():
        raise NotOurs(f"{option} {path} is a folder; give a file name (e.g. {path / 'out'})")
    if path.is_symlink() or (path.exists() and not ours(path)):
        raise NotOurs(f"{option} {path} exists and was not written by iqa; choose a new file name or move it away")
    return path


def folder_state(folder: Path, mark: str) -> str:
    """What `folder` is to an iqa command about to write there: "new" (absent, or an empty folder),
    "marked" (a folder holding the command's `mark` file: an earlier output of it), "file" (a file or
    a link: never iqa's) or "foreign" (a folder of someone else's files). Commands write only into
    new or marked folders, each refusing the others with its own message."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        return "file"
    if not folder.exists() or not any(folder.iterdir()):
        return "new"
    return "marked" if (folder / mark).is_file() else "foreign"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def unique_part() -> str:
    """`<pid>-<32 hex digits>`: what makes each temporary's name its writer's own (and tells whether it is alive)."""
    return f"{os.getpid()}-{uuid.uuid4().hex}"


def remove_stale(parent: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Remove `<prefix><pid>-<32 hex><suffix>` temporaries in `parent` (exactly the names iqa gives them)
    whose writing process is gone (killed or crashed runs leave them); those of live processes,
    concurrent runs, are left alone, and so is every other name, however alike."""
    removed = []
    if not Path(parent).is_dir():
        return removed
    ours = re.compile(re.escape(prefix) + r"(\d+)-[0-9a-f]{32}" + re.escape(suffix))
    for path in Path(parent).iterdir():
        match = ours.fullmatch(path.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
