"""Archive rules: what a task file's archive may hold, checked at upload and again at unpack.

A task file that is an archive (.zip, .tar.gz, .tgz, .tar) is unpacked into a run's folder.
Members that would land outside that folder (absolute paths, ``..``, links, devices) are
refused twice: when the archive is uploaded (:func:`check_archive`, called by the store, so a
bad package is never stored) and again when it is unpacked (:func:`unpack_zip`,
:func:`unpack_tar`, called by the agent), so an uploaded package cannot write anywhere else on
the server even if it was stored before the upload check existed.

These rules sit below the store and the agent: both use them, neither owns them.
"""

from __future__ import annotations

import io
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from .exceptions import CloudTaskError

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
