"""Task files: JSON files (or folders of ``*.json``) each holding one task or a list of them,
read and checked for ``cloudtask validate``, ``cloudtask apply`` and ``cloudtask up``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .clock import utcnow
from .jsonlimits import JSONDepthError, loads
from .task import validate_task


def task_file_paths(paths: tuple[str, ...]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.glob("*.json") if p.is_file())
        else:
            yield path


def read_task_files(
    paths: tuple[str, ...], *, past_ok: bool = False
) -> tuple[list[tuple[Path, dict]], list[str]]:
    """Read task files: each holds one task object or a list of them. Returns (tasks, errors).
    A one-shot time in the past is refused here, up front, unless ``past_ok`` (``apply``:
    the operations refuse it only in a new or changed schedule, so a one-shot that ran and
    was exported applies back unchanged)."""
    tasks: list[tuple[Path, dict]] = []
    errors: list[str] = []
    now = None if past_ok else utcnow()
    for path in task_file_paths(paths):
        try:
            data = loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            errors.append(f"{path}: cannot read: {e.strerror}")
            continue
        except UnicodeDecodeError as e:
            errors.append(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}")
            continue
        except json.JSONDecodeError as e:
            errors.append(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}")
            continue
        except JSONDepthError as e:
            errors.append(f"{path}: not usable JSON: {e}")
            continue
        items = data if isinstance(data, list) else [data]
        for i, item in enumerate(items):
            where = f"{path}[{i}]" if isinstance(data, list) else str(path)
            problems = validate_task(item, now=now)
            if problems:
                errors.extend(f"{where}: {p}" for p in problems)
            else:
                tasks.append((path, item))
    names = [t[1]["name"] for t in tasks]
    for name in {n for n in names if names.count(n) > 1}:
        errors.append(f"task name {name!r} is defined more than once")
    return tasks, errors
