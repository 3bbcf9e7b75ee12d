"""Atomic writes of files and folders: a crash or an error mid-write leaves the previous one, never half of it."""

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; write it in the block. On success it is flushed to
    disk and renamed onto `target` (one atomic step); on any error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent, f".{target.name}-")
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}-{os.getpid()}-", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a written file follows the umask like any other
    os.close(fd)
    tmp = Path(name)
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
    unique = f"{os.getpid()}-{uuid.uuid4().hex}"
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


def remove_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove `<prefix><pid>-...` temporaries in `parent` whose writing process is gone (killed or
    crashed runs leave them); those of live processes, concurrent runs, are left alone."""
    removed = []
    if not Path(parent).is_dir():
        return removed
    for path in Path(parent).glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
