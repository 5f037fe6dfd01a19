"""``cloudtask export``: stored tasks written as task files that ``cloudtask apply`` reads back
as they are (a no-op).

Each task is written in its short form (:func:`short_form`): the canonical spec without the
keys at their defaults, keys in the model's order, secrets as the references they are stored
as (``{"secret": NAME}``: a value is never stored in a task). The short form is checked to
parse back to the very same spec; when it does not, the full canonical form is written.

File names come from task names (:func:`file_names`): letters, digits, ``.``, ``_`` and
``-`` only, no leading dot or dash, no name Windows reserves, at most 100 characters, and
names that differ only in case (or once made safe) get ``-2``, ``-3``... so no two tasks
share a file on any file system.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .taskdiff import canonical

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10))}
_RESERVED |= {f"lpt{i}" for i in range(10)}
MAX_STEM = 100
_EMPTY = (None, False, "", [], {}, "UTC", "0s")  # values that may be defaults, tried last
_KEEP = {"name", "schedule", "urls", "image"}


def _reference(**extra: Any) -> dict[str, Any]:
    return canonical({"name": "x", "schedule": {"every": "1m"}, **extra})


# a minimal task's canonical form: every default (a task calling a web service has no command)
_DEFAULTS = {**_reference(command="x"), "command": None}
_HTTP_DEFAULTS = _reference(http={"url": "http://x"})["http"]


def _containers(spec: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The objects whose keys may be left out, each with its defaults."""
    out = [(spec, _DEFAULTS)]
    if isinstance(spec.get("http"), dict):
        out.append((spec["http"], _HTTP_DEFAULTS))
    if isinstance(spec.get("notify"), dict):
        out.append((spec["notify"], _DEFAULTS["notify"]))
    if isinstance(spec.get("container"), dict):  # (a field of a newer version is kept)
        out.append((spec["container"], {}))
    schedule = spec.get("schedule")
    for item in schedule if isinstance(schedule, list) else [schedule]:
        if isinstance(item, dict):
            out.append((item, {}))
    return out


def short_form(spec: dict[str, Any]) -> dict[str, Any]:
    """A stored (or any valid) spec without the keys at their defaults; it parses back to the
    same canonical spec. ValidationError if ``spec`` does not parse."""
    full = canonical(spec)
    short = copy.deepcopy(full)
    for obj, defaults in _containers(short):
        for key in list(obj):
            if key in _KEEP:
                continue
            value = obj[key]
            if key in defaults:
                if defaults[key] == value:
                    del obj[key]
            elif any(value == e and type(value) is type(e) for e in _EMPTY):
                del obj[key]
    if _same(short, full):
        return short
    return _greedy(full)


def _same(candidate: dict[str, Any], full: dict[str, Any]) -> bool:
    try:
        return canonical(candidate) == full
    except Exception:  # noqa: BLE001 (a candidate that does not parse is simply not taken)
        return False


def _greedy(full: dict[str, Any]) -> dict[str, Any]:
    """The slow way: each key left out in turn, kept out when the spec is still the same."""
    short = copy.deepcopy(full)
    for index in range(len(_containers(short))):
        obj = _containers(short)[index][0]
        for key in list(obj):
            if key in _KEEP:
                continue
            trial = copy.deepcopy(short)
            del _containers(trial)[index][0][key]
            if _same(trial, full):
                short = trial
    return short


def file_stem(name: str) -> str:
    """A task name made into a safe file name stem (see the module's doc)."""
    stem = _UNSAFE.sub("_", name).lstrip(".-").rstrip(".")
    stem = stem[:MAX_STEM].rstrip(".") or "task"
    if stem.split(".")[0].lower() in _RESERVED:
        stem = "_" + stem
    return stem


def file_names(names: Iterable[str]) -> dict[str, str]:
    """task name -> its file name (``STEM.json``), distinct even ignoring case; names are
    taken in sorted order, so the same tasks always get the same files."""
    used: set[str] = set()
    out = {}
    for name in sorted(set(names)):
        stem = file_stem(name)
        candidate, n = f"{stem}.json", 2
        while candidate.lower() in used:
            candidate, n = f"{stem}-{n}.json", n + 1
        used.add(candidate.lower())
        out[name] = candidate
    return out


def dump(spec: dict[str, Any]) -> str:
    """A task file's text: the short form, indented, UTF-8 as it is, a final newline."""
    return json.dumps(spec, indent=2, ensure_ascii=False) + "\n"


def write_file(folder: Path, file_name: str, text: str) -> Path:
    """Write ``folder/file_name`` whole or not at all (a temporary file renamed over it; a
    symbolic link there is replaced, never followed)."""
    if Path(file_name).name != file_name or file_name in (".", ".."):
        raise ValueError(f"not a plain file name: {file_name!r}")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".export-", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # as an ordinary new file (mkstemp makes it 0600)
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        target = folder / file_name
        os.replace(tmp, target)
        return target
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # read it the only way there is, and put it back
    os.umask(mask)
    return mask
