"""What makes a store unusable or unfinished (`iqa verify`): metadata, manifest, chunks, layers and images."""

from pathlib import Path

from iqa.cache.integrity import read_checked
from iqa.cache.manifest import manifest_checksum, manifest_path, read_manifest
from iqa.cache.stamps import describe_changes
from iqa.cache.store import EmbeddingStore, layer_pooling_problem


def verify_store(path: Path, rehash: bool = False) -> list[str]:
    """Problems that make a store unusable or unfinished; empty when it is complete and sound.
    `rehash` hashes every image file again instead of trusting an unchanged stat.

    Invalid rows (unreadable images, recorded with their reason) are not problems of the store.
    """
    try:
        store = EmbeddingStore(path)
    except (OSError, ValueError, KeyError) as err:
        return [f"cannot open as an embedding store: {err}"]
    problems = []
    manifest_file = manifest_path(path.parent.parent, path.parent.name)
    if not manifest_file.exists():
        problems.append(f"no manifest at {manifest_file}")
    elif manifest_checksum(path.parent.parent, path.parent.name) != store.fingerprint.get("manifest_sha256"):
        problems.append("stale: the manifest changed since extraction")
    done = store.done_chunks()
    if not done.all():
        problems.append(f"incomplete: {int((~done).sum())} of {store.n_chunks} chunks not written")
    if todo := store.extension_todo():
        problems.append(f"incomplete: layers {store.extending} being added, {len(todo)} of {store.n_chunks} chunks to go; "
                        f"`iqa extract` on this store finishes them")
    try:
        paths = read_manifest(path.parent.parent, path.parent.name).paths
    except (OSError, ValueError, KeyError):  # a missing or broken manifest: no keys to compare against
        paths = None
    rows = read_checked(store, paths, tuple(store.arrays))
    if rows.damaged:
        problems.append(f"damaged: {rows.describe(store)}; `iqa extract` on this store recomputes those chunks")
    if stale_layers := layer_pooling_problem(store, "iqa extract"):
        problems.append(f"stale: {stale_layers}")
    if paths is not None and (changes := store.changed_images(read_manifest(path.parent.parent, path.parent.name), rehash)):
        problems.append(f"stale: {describe_changes(changes, paths)}; `iqa extract` on this store recomputes their chunks")
    return problems
