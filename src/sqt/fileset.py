"""A directory written as one set of files, complete or absent: the files go into a sibling
temporary directory, are fsynced, and the directory is renamed into place, the previous set kept
aside until the new one stands. After a kill at any point a reader finds the old set or the new
one, never a mix. A manifest written last (every file's size and sha256) lets a reader tell a set
that was edited, truncated or swapped file by file afterwards.

The protocol, for `write_set(D, files)`:
  0. recover: finish what an earlier kill left (see `recover`);
  1. make `.D.new-*` beside D and write every file into it, each fsynced, the manifest last;
  2. fsync that directory;  3. rename D to `.D.old` (when D exists);
  4. rename `.D.new-*` to D;  5. fsync the parent;  6. remove `.D.old`.
A reader (`settled`) takes D when it exists, else `.D.old`: between 3 and 4 that is the previous
complete set. `.D.new-*` is never read."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1

crash_hook: Optional[Callable[[str], None]] = None
"""Called with a label at every point between two writes or renames of `write_set`. Nothing sets
it in normal use; the tests set it to kill a save at each point in turn."""


class FileSetError(ValueError):
    """A set that is incomplete, or that no longer matches its manifest."""


def point(label: str) -> None:
    """A point between two writes, where a kill may land (see `crash_hook`)."""
    if crash_hook is not None:
        crash_hook(label)


def aside(directory: Path) -> Path:
    """Where the previous set waits while a new one is renamed into place."""
    return directory.parent / f".{directory.name}.old"


def pending(directory: Path) -> list[Path]:
    """Unfinished new sets of `directory` (left by a kill before their rename)."""
    if not directory.parent.is_dir():
        return []
    return sorted(directory.parent.glob(f".{directory.name}.new-*"))


def settled(directory) -> Optional[Path]:
    """The complete set to read at `directory`: itself, or, after a kill between the two renames
    of a replacement, the previous set kept aside; None when there is neither."""
    directory = Path(directory)
    if directory.is_dir():
        return directory
    kept = aside(directory)
    return kept if kept.is_dir() else None


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX; elsewhere directories cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(directory) -> None:
    """For a writer (one at a time): put the previous set back when a kill left only it, drop it
    when the new set is in place, and remove unfinished new sets."""
    directory = Path(directory)
    kept = aside(directory)
    if kept.is_dir():
        if directory.exists():
            shutil.rmtree(kept)
        else:
            os.rename(kept, directory)
        _fsync_dir(directory.parent)
    for unfinished in pending(directory):
        shutil.rmtree(unfinished)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _manifest(files: Mapping[str, bytes], extra: Mapping) -> bytes:
    listing = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
               for name, data in files.items()}
    doc = {"format": MANIFEST_FORMAT, **extra, "files": listing}
    return (json.dumps(doc, indent=2) + "\n").encode()


def write_set(directory, files: Mapping[str, bytes], *, replaceable: Iterable[str],
              manifest: Optional[Mapping] = None) -> Path:
    """Replace `directory` by exactly `files` (name -> bytes), as one set. An existing directory
    is replaced only when every file in it is named in `replaceable` (a ValueError otherwise:
    nothing of anyone else's is deleted). `manifest`: extra fields (such as the step) for a
    manifest.json written last, or None for no manifest."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover(directory)
    if directory.exists():
        if not directory.is_dir():
            raise ValueError(f"{str(directory)!r} is a file: expected a directory to write into")
        allowed = set(replaceable) | {MANIFEST}
        stray = sorted(p.name for p in directory.iterdir() if p.name not in allowed)
        if stray:
            raise ValueError(f"{str(directory)!r} holds other files ({', '.join(stray[:5])}): "
                             "expected a new or empty directory, or one this kind of save wrote")
    new = directory.parent / f".{directory.name}.new-{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(new)
    point("made the new directory")
    for name, data in files.items():
        _write_synced(new / name, data)
        point(f"wrote {name}")
    if manifest is not None:
        _write_synced(new / MANIFEST, _manifest(files, manifest))
        point(f"wrote {MANIFEST}")
    _fsync_dir(new)
    point("synced the new directory")
    previous = aside(directory)
    if directory.exists():
        os.rename(directory, previous)
        point("moved the previous set aside")
    os.rename(new, directory)
    point("renamed the new set into place")
    _fsync_dir(directory.parent)
    point("synced the parent directory")
    if previous.exists():
        shutil.rmtree(previous)
        point("removed the previous set")
    return directory


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(directory, *, members: Iterable[str] = ()) -> Optional[dict]:
    """The manifest of the set at `directory` once every file it lists is checked (size, then
    sha256), or None when the directory has no manifest. A FileSetError names the first file that
    is missing or changed, or one of `members` (the names a set of this kind may hold) present but
    not listed: added afterwards. Other files beside the set are not its business."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        listing = doc["files"]
        sizes = {name: (int(entry["bytes"]), str(entry["sha256"]))
                 for name, entry in listing.items()}
        outside = [name for name in sizes if Path(name).name != name or name.startswith(".")]
        if outside:
            raise ValueError(f"it lists {outside[0]!r}, not a file of the set")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise FileSetError(f"{str(path)!r} is not a valid manifest ({type(e).__name__}: {e}); "
                           "the set is corrupt") from None
    for name, (size, sha) in sizes.items():
        file = directory / name
        if not file.is_file():
            raise FileSetError(f"{str(file)!r} is missing: its manifest lists it, so the set is "
                               "incomplete")
        found = (file.stat().st_size, None)
        if found[0] == size:
            found = (size, _sha256_of(file))
        if found != (size, sha):
            got = f", sha256 {found[1][:12]}..." if found[1] else ""
            raise FileSetError(
                f"{str(file)!r} was changed after the set was written ({found[0]} bytes{got}; "
                f"{MANIFEST} records {size} bytes, sha256 {sha[:12]}...): it was edited, cut "
                "short or swapped in from another set")
    stray = sorted(name for name in set(members) - set(sizes) if (directory / name).exists())
    if stray:
        raise FileSetError(f"{str(directory)!r} holds {', '.join(stray)}, which its {MANIFEST} "
                           "does not list: added after the set was written")
    return doc
