"""Task files on an agent: fetched from the store, cached by sha256, laid out per run.

Files live in MongoDB (GridFS), named, in versions that each carry their sha256 (see
:mod:`cloudtask.store.files`). A task follows the latest version of its ``file``, or pins one
by sha256 (``file_version``). An agent keeps every version it fetched in a cache folder under
its sha256 (checked on download), and lays it out in a fresh working folder per run: a plain
file is copied there with the executable bit set; an archive is unpacked there by the rules of
:mod:`cloudtask.archives` (checked again as it is unpacked).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import threading
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..archives import TaskFileError, unpack_tar, unpack_zip
from ..exceptions import CloudTaskError, NotFound

if TYPE_CHECKING:
    from ..store import Store

__all__ = ["FileCache", "TaskFileError"]

log = logging.getLogger(__name__)


class FileCache:
    """Fetches task files from the store (by name, or a pinned version by sha256), keeps them
    by content hash, and lays them out per run."""

    def __init__(self, store: Store, cache_dir: Path) -> None:
        self.store = store
        self.cache_dir = cache_dir
        self._lock = threading.Lock()

    def _version(self, name: str, version: str | None) -> dict[str, Any]:
        """The metadata of the version a run uses: the pinned one, else the latest."""
        if version is None:
            try:
                return self.store.latest_file(name)
            except CloudTaskError as e:
                raise TaskFileError(f"task file {name!r}: {e}") from None
        try:
            return self.store.file_version(name, version)
        except NotFound:
            raise TaskFileError(
                f"task file {name!r}: the pinned version {version[:12]} is no longer stored "
                "(deleted, or never uploaded under this name); pin a stored version "
                "(cloudtask file versions NAME) or clear file_version to follow the latest"
            ) from None
        except CloudTaskError as e:
            raise TaskFileError(f"task file {name!r} version {version[:12]}: {e}") from None

    def cached(self, name: str, version: str | None = None) -> tuple[Path, dict]:
        """The version of ``name`` a run uses (``version``: a pinned sha256, None for the
        latest) in the cache, downloaded and checked against its sha256 if needed, with its
        metadata."""
        meta = self._version(name, version)
        sha256 = meta["sha256"]
        path = self.cache_dir / sha256
        with self._lock:
            if not path.is_file():
                try:
                    data = self.store.get_file_by_hash(sha256)
                except CloudTaskError as e:  # deleted between the two reads, or store down
                    raise TaskFileError(f"task file {name!r}: {e}") from None
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

    def lay_out(self, name: str, run_dir: Path, version: str | None = None) -> dict:
        """Put the task's file (the pinned ``version``, else the latest) into ``run_dir``
        (created). Returns the file's metadata."""
        path, meta = self.cached(name, version)
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
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise TaskFileError(f"task file {name!r} cannot be laid out: {e}") from None
        return meta
