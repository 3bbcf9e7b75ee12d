"""What each image file was when it was embedded: its size, mtime and a hash of its bytes.

A store keeps one stamp per row (`image_stamps`, (N, 3) int64). A later run compares the files on
disk with them: size and mtime are a cheap first look (one stat per image); only files whose stat
differs are read again, and they count as changed only when their bytes differ too, so copying a
dataset (new mtimes, same bytes) changes nothing. The hashes also enter the key of every result
trained on the store (`content_digest`): an image replaced and re-extracted gives new results.
"""

import hashlib
import os
from pathlib import Path

import numpy as np

UNKNOWN = (0, 0, 0)  # rows written before stores kept stamps: nothing to compare against
MISSING = (-1, -1, 0)  # no file at extraction time


def content_hash(data: bytes) -> int:
    """64 bits of blake2b of the bytes, as a signed int64."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def stamp(stat: os.stat_result, data: bytes) -> np.ndarray:
    return np.array([stat.st_size, stat.st_mtime_ns, content_hash(data)], dtype=np.int64)


def missing_stamp() -> np.ndarray:
    return np.array(MISSING, dtype=np.int64)


def changed_images(stamps: np.ndarray, image_root: Path, paths: list[str]) -> dict[int, str]:
    """Row -> "changed", "deleted" or "appeared", for each row whose file is no longer what was embedded."""
    changes = {}
    for row, recorded in enumerate(stamps):
        if (recorded == UNKNOWN).all():
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
        elif (stat.st_size, stat.st_mtime_ns) != (recorded[0], recorded[1]):
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
    if (stamps == np.array(UNKNOWN)).all():
        return None
    return hashlib.sha256(np.ascontiguousarray(stamps[:, 2]).tobytes()).hexdigest()[:8]
