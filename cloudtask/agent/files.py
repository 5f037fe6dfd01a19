"""Task files: a script, a binary or a .zip/.tar.gz package a task runs with.

Files live in MongoDB (GridFS), named, in versions that each carry their sha256 (see the files
section of :class:`~cloudtask.store.Store`). A task follows the latest version of its ``file``,
or pins one by sha256 (``file_version``). An agent keeps every version it fetched in a cache
folder under its sha256 (checked on download), and lays it out in a fresh working folder per
run: a plain file is copied there with the executable bit set; an archive is unpacked there.

Archive members that would land outside that folder (absolute paths, ``..``, links, devices)
are refused twice: when the archive is uploaded (:func:`check_archive`, so a bad package is
never stored) and again when it is unpacked, so an uploaded package cannot write anywhere else
on the server even if it was stored before the upload check existed.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import stat
import tarfile
import threading
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from ..exceptions import CloudTaskError, NotFound

if TYPE_CHECKING:  # the store imports this module's checks: no import cycle at run time
    from ..store import Store

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
MAX_UNPACKED_BYTES = 4 * 2**30  # what an archive may unpack to, at upload
MAX_MEMBERS = 100_000
# what an archive may hold besides plain files and folders: nothing
_SPECIAL_MODES = (stat.S_ISLNK, stat.S_ISCHR, stat.S_ISBLK, stat.S_ISFIFO, stat.S_ISSOCK)


class TaskFileError(CloudTaskError):
    """A task's file could not be fetched, checked or laid out; the run fails with this message."""


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def member_problem(name: str) -> str | None:
    """Why an archive member named ``name`` would land outside the run folder, or None."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        return f"archive member {name!r} would land outside the run folder"
    return None


def _safe_member(root: Path, name: str) -> Path:
    if problem := member_problem(name):
        raise TaskFileError(problem)
    target = (root / PurePosixPath(name.replace("\\", "/"))).resolve()
    if not target.is_relative_to(root.resolve()):
        raise TaskFileError(f"archive member {name!r} would land outside the run folder")
    return target


def _zip_member_problem(info: zipfile.ZipInfo) -> str | None:
    if problem := member_problem(info.filename):
        return problem
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return f"archive member {info.filename!r} is a link; links are refused"
    if any(check(mode) for check in _SPECIAL_MODES):
        return f"archive member {info.filename!r} is not a plain file or folder"
    return None


def _tar_member_problem(member: tarfile.TarInfo) -> str | None:
    if problem := member_problem(member.name):
        return problem
    if member.issym() or member.islnk():
        return (
            f"archive member {member.name!r} is a link (to {member.linkname!r}); "
            "links are refused: it is not a plain file or folder"
        )
    if not (member.isfile() or member.isdir()):
        return f"archive member {member.name!r} is not a plain file or folder"
    return None


def check_archive(name: str, data: bytes) -> None:
    """Refuse (TaskFileError naming the member) an archive that does not open, or holds a
    member that is unsafe to unpack: absolute or ``..`` paths, links, devices. A name that is
    not an archive's (see :data:`ARCHIVE_SUFFIXES`) is not checked."""
    lower = name.lower()
    if not is_archive(lower):
        return
    unpacked = members = 0

    def count(size: int) -> None:
        # an archive bomb (a small upload that unpacks to gigabytes) would fill every agent's
        # disk once per run: the unpacked size and the number of members are bounded
        nonlocal unpacked, members
        unpacked, members = unpacked + max(0, size), members + 1
        if unpacked > MAX_UNPACKED_BYTES:
            raise TaskFileError(
                f"{name!r} unpacks to more than {MAX_UNPACKED_BYTES // 2**20} MiB: too large"
            )
        if members > MAX_MEMBERS:
            raise TaskFileError(f"{name!r} has more than {MAX_MEMBERS} members: too many")

    try:
        if lower.endswith(".zip"):
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for info in zf.infolist():
                    if problem := _zip_member_problem(info):
                        raise TaskFileError(problem)
                    count(info.file_size)
                if (broken := zf.testzip()) is not None:
                    raise TaskFileError(f"archive member {broken!r} is damaged (bad checksum)")
            return
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            for member in tf:  # reads every header: a truncated archive fails here
                if problem := _tar_member_problem(member):
                    raise TaskFileError(problem)
                count(member.size)
                if member.isfile():
                    extracted = tf.extractfile(member)
                    if extracted is not None:  # reading it checks the compressed stream
                        while extracted.read(1 << 20):
                            pass
    except TaskFileError:
        raise
    # gzip's bad header is an OSError, a zip's unknown compression method a NotImplementedError
    except (
        zipfile.BadZipFile,
        tarfile.TarError,
        EOFError,
        zlib.error,
        OSError,
        ValueError,
        NotImplementedError,
    ) as e:
        kind = "zip" if lower.endswith(".zip") else "tar"
        reason = str(e)
        if reason.startswith("file could not be opened successfully"):
            # tarfile lists what it tried, one line per compression: say it in one
            reason = "neither a tar file nor a gzip, bzip2 or xz compressed one"
        raise TaskFileError(f"{name!r} is not a readable {kind} archive: {reason}") from None


def unpack_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            target = _safe_member(dest, info.filename)
            if problem := _zip_member_problem(info):
                raise TaskFileError(problem)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            if (info.external_attr >> 16) & 0o111:
                target.chmod(0o755)


def unpack_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tf:
        for member in tf.getmembers():
            _safe_member(dest, member.name)
            if problem := _tar_member_problem(member):
                raise TaskFileError(problem)
        # the "data" filter refuses what is left: absolute names, links out, special files
        tf.extractall(dest, filter="data")


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
