"""Task files: a script, a binary or a .zip/.tar.gz package a task runs with.

Files live in MongoDB (GridFS), named, with their sha256. An agent fetches the latest version
of a task's ``file`` by name, keeps it in a cache folder under its sha256 (checked on
download), and lays it out in a fresh working folder per run: a plain file is copied there
with the executable bit set; an archive is unpacked there. Archive members that would land
outside that folder (absolute paths, ``..``, links pointing out, devices) are refused, so an
uploaded package cannot write anywhere else on the server.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tarfile
import threading
import zipfile
from pathlib import Path, PurePosixPath

from ..exceptions import CloudTaskError
from ..store import Store

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")


class TaskFileError(CloudTaskError):
    """A task's file could not be fetched or laid out; the run fails with this message."""


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _safe_member(root: Path, name: str) -> Path:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise TaskFileError(f"archive member {name!r} would land outside the run folder")
    target = (root / pure).resolve()
    if not target.is_relative_to(root.resolve()):
        raise TaskFileError(f"archive member {name!r} would land outside the run folder")
    return target


def unpack_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            target = _safe_member(dest, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise TaskFileError(
                    f"archive member {info.filename!r} is a link; links are refused"
                )
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            if mode & 0o111:
                target.chmod(0o755)


def unpack_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            _safe_member(dest, member.name)
            if not (member.isfile() or member.isdir()):
                raise TaskFileError(f"archive member {member.name!r} is not a plain file or folder")
        # the "data" filter refuses what is left: absolute names, links out, special files
        tf.extractall(dest, filter="data")


class FileCache:
    """Fetches task files by name from the store and lays them out per run."""

    def __init__(self, store: Store, cache_dir: Path) -> None:
        self.store = store
        self.cache_dir = cache_dir
        self._lock = threading.Lock()

    def cached(self, name: str) -> tuple[Path, dict]:
        """The latest stored version of ``name`` in the cache (downloaded if needed) and its metadata."""
        try:
            meta = self.store.latest_file(name)
        except CloudTaskError as e:
            raise TaskFileError(f"task file {name!r}: {e}") from None
        sha256 = meta["sha256"]
        path = self.cache_dir / sha256
        with self._lock:
            if not path.is_file():
                data = self.store.get_file_by_hash(sha256)
                if hashlib.sha256(data).hexdigest() != sha256:
                    raise TaskFileError(
                        f"task file {name!r}: the stored content does not match its sha256"
                    )
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(".part")
                partial.write_bytes(data)
                os.replace(partial, path)
                log.info("cached task file %s (%s, %d bytes)", name, sha256[:12], len(data))
        return path, meta

    def lay_out(self, name: str, run_dir: Path) -> dict:
        """Put the task's file into ``run_dir`` (created). Returns the file's metadata."""
        path, meta = self.cached(name)
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lower = name.lower()
            if lower.endswith(".zip"):
                unpack_zip(path, run_dir)
            elif lower.endswith((".tar.gz", ".tgz", ".tar")):
                unpack_tar(path, run_dir)
            else:
                target = run_dir / PurePosixPath(name).name
                shutil.copyfile(path, target)
                target.chmod(0o755)
        except (zipfile.BadZipFile, tarfile.TarError, OSError) as e:
            raise TaskFileError(f"task file {name!r} cannot be laid out: {e}") from None
        return meta
