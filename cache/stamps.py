"""What each image file was when it was embedded: its size, mtime, a hash of its bytes, ctime and inode.

A store keeps one stamp per row (`image_stamps`, (N, 5) int64; stores made before ctime and inode
were kept hold the first 3 columns). A later run compares the files on disk with them: size,
mtime, ctime and inode are a cheap first look (one stat per image); only files whose stat differs
are read again, and they count as changed only when their bytes differ too, so copying a dataset
(new mtimes, ctimes and inodes, same bytes) changes nothing. A file rewritten in place with its old
size and mtime put back (an archive extracted with preserved mtimes) still gets a new ctime, and a
file replaced by another gets a new inode: both are re-hashed. What a stat cannot see (bytes
changed with the clock or ctime forged back, a 3-column store's same-size same-mtime rewrite)
`iqa cache verify --rehash` finds by hashing every file. The hashes also enter the key of every
result trained on the store (`content_digest`): an image replaced and re-extracted gives new results.
"""

import hashlib
import os
from pathlib import Path

import numpy as np

UNKNOWN = (0, 0, 0)  # rows written before stores kept stamps: nothing to compare against
MISSING = (-1, -1, 0, 0, 0)  # no file at extraction time
WIDTH = len(MISSING)  # columns of a stamp: size, mtime_ns, content hash, ctime_ns, inode


def content_hash(data: bytes) -> int:
    """64 bits of blake2b of the bytes, as a signed int64."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def stamp(stat: os.stat_result, data: bytes) -> np.ndarray:
    return np.array([stat.st_size, stat.st_mtime_ns, content_hash(data), stat.st_ctime_ns, stat.st_ino], dtype=np.int64)


def same_stat(stat: os.stat_result, recorded: np.ndarray) -> bool:
    """Whether the file's stat is the recorded one (size and mtime; ctime and inode where the store kept them)."""
    now = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    kept = (recorded[0], recorded[1], *recorded[3:5])
    return now[:len(kept)] == tuple(kept)


def missing_stamp() -> np.ndarray:
    return np.array(MISSING, dtype=np.int64)


def changed_images(stamps: np.ndarray, image_root: Path, paths: list[str], rehash: bool = False) -> dict[int, str]:
    """Row -> "changed", "deleted" or "appeared", for each row whose file is no longer what was embedded
    (`rehash`: every file's bytes hashed, whatever its stat says)."""
    changes = {}
    for row, recorded in enumerate(stamps):
        if (recorded[:3] == UNKNOWN).all():
            continue
        path = image_root / paths[row]
        try:
            stat = path.stat()
        except OSError:
            if recorded[0] != MISSING[0]:
                changes[row] = "deleted"
            continue
        if recorded[0] == MISSING[0]:
            changes[row] = "appeared"
        elif rehash or not same_stat(stat, recorded):
            try:
                same = stat.st_size == recorded[0] and content_hash(path.read_bytes()) == recorded[2]
            except OSError:
                same = False
            if not same:
                changes[row] = "changed"
    return changes


def describe_changes(changes: dict[int, str], paths: list[str]) -> str:
    """'3 images changed since extraction (a.png changed, b.png deleted, ...)'."""
    named = [f"{paths[row]} {what}" for row, what in sorted(changes.items())[:3]]
    more = ", ..." if len(changes) > 3 else ""
    return f"{len(changes)} image{'s' if len(changes) != 1 else ''} changed since extraction ({', '.join(named)}{more})"


def content_digest(stamps: np.ndarray) -> str | None:
    """A short digest of every row's content hash; None for a store that predates stamps."""
    if (stamps[:, :3] == np.array(UNKNOWN)).all():
        return None
    return hashlib.sha256(np.ascontiguousarray(stamps[:, 2]).tobytes()).hexdigest()[:8]
