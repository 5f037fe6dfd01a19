"""A task's ``container``: an image run through the Docker engine instead of a command.

The part of a task spec (see :mod:`cloudtask.task`) that names what to run in a container,
and its validation, every problem with its path (``container.volumes[1]``)::

    "container": {
        "image": "registry.example.com/reports/builder:2.4",
        "args": ["--day", "yesterday"],
        "env": {"REPORT_LANG": "de"},
        "volumes": ["/srv/reports:/out", "/etc/reports:/config:ro"],
        "cpus": 1.5,
        "memory": "512m"
    }

* ``image`` (required): a Docker image reference, ``[registry[:port]/]path[:tag][@digest]``
  (path components in lower case), at most 255 characters. An image the engine does not
  have is pulled before the first run.
* ``args``: the command given to the image (after its entrypoint), a list of strings.
* ``env``: variables of the container, on top of the task's own ``env`` and the run's
  ``CLOUDTASK_*`` variables, which the container gets too.
* ``volumes``: bind mounts ``"host:container"`` or ``"host:container:ro"`` (``:rw`` is the
  default), both absolute paths without ``..``.
* ``cpus``: CPUs the container may use (a number > 0, at most 1024); ``memory``: its memory
  limit, ``"512m"``, ``"2g"``, ``"65536k"`` or bytes (at least 6 MiB, the engine's minimum).

How the agent runs it is :mod:`cloudtask.agent.container` and
:mod:`cloudtask.agent.containerrun`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .exceptions import Problem
from .schedules import show_value

__all__ = [
    "CONTAINER_KEYS",
    "ContainerSpec",
    "format_memory",
    "image_problem",
    "parse_memory",
    "read_container",
    "volume_problem",
]

CONTAINER_KEYS = ("image", "args", "env", "volumes", "cpus", "memory")
MAX_IMAGE_CHARS = 255
MAX_ARGS = 1000
MAX_ARGS_BYTES = 64 * 1024  # the arguments joined by spaces, in UTF-8 (like a command)
MAX_VOLUMES = 100
MAX_PATH_CHARS = 4096
MAX_CPUS = 1024.0
MIN_MEMORY = 6 * 1024 * 1024  # the engine refuses less
MAX_MEMORY = 1 << 50  # 1 PiB: a typo, not a machine

# the reference grammar of Docker's distribution/reference, IPv6 hosts left out
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_PART}(?:/{_PATH_PART})*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_PATTERN = re.compile(rf"({_NAME})(?::({_TAG}))?(?:@({_DIGEST}))?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MEMORY = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([bkmg]?)b?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


@dataclass(frozen=True)
class ContainerSpec:
    """A validated ``container`` (see the module's docstring); ``memory`` in bytes."""

    image: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    volumes: tuple[str, ...] = ()
    cpus: float | None = None
    memory: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "args": list(self.args),
            "env": dict(self.env),
            "volumes": list(self.volumes),
            "cpus": self.cpus,
            "memory": format_memory(self.memory) if self.memory is not None else None,
        }


def image_problem(image: str) -> str | None:
    """Why ``image`` is not an image reference Docker takes, or None."""
    if not image:
        return "must not be empty"
    if len(image) > MAX_IMAGE_CHARS:
        return f"is {len(image)} characters; at most {MAX_IMAGE_CHARS} are taken"
    match = IMAGE_PATTERN.fullmatch(image)
    if match is None or len(match.group(1)) > MAX_IMAGE_CHARS:
        hint = " (path components are lower case)" if image.lower() != image else ""
        return (
            f"{image!r} is not an image reference such as 'alpine:3.20' or "
            f"'registry.example.com:5000/team/app@sha256:...'{hint}"
        )
    return None


def volume_problem(volume: str) -> str | None:
    """Why ``volume`` is not ``"host:container[:ro|rw]"`` with absolute paths, or None."""
    parts = volume.split(":")
    if len(parts) == 3 and parts[2] not in ("ro", "rw"):
        return f"{volume!r}: the mode after the second ':' is ro or rw, got {parts[2]!r}"
    if len(parts) not in (2, 3):
        return f"{volume!r} is not 'host:container' or 'host:container:ro' (absolute paths)"
    for what, path in (("host", parts[0]), ("container", parts[1])):
        if not path.startswith("/"):
            return f"{volume!r}: the {what} path must be absolute (begin with '/')"
        if ".." in path.split("/"):
            return f"{volume!r}: the {what} path must not contain '..'"
        if len(path) > MAX_PATH_CHARS or any(ord(c) < 32 for c in path):
            return f"{volume!r}: the {what} path is too long or holds control characters"
    if parts[1] == "/":
        return f"{volume!r}: the container path must not be '/'"
    return None


def parse_memory(value: Any) -> int:
    """Bytes of a memory limit: ``"512m"``, ``"2g"``, ``"1.5g"``, ``"65536k"``, ``"1024b"`` or
    a whole number of bytes. ValueError saying why for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '512m' or '2g', got {show_value(value)}")
    if isinstance(value, int):
        amount = value
    elif isinstance(value, str) and (match := _MEMORY.fullmatch(value.strip())):
        number = float(match.group(1))
        amount = math.floor(number * _UNITS[match.group(2).lower()])
    else:
        raise ValueError(f"expected a size such as '512m' or '2g', got {show_value(value)}")
    if amount < MIN_MEMORY:
        raise ValueError(f"is {amount:,} bytes; the engine needs at least 6m ({MIN_MEMORY:,})")
    if amount > MAX_MEMORY:
        raise ValueError(f"is {amount:,} bytes; at most {MAX_MEMORY:,} are taken")
    return amount


def format_memory(amount: int) -> str:
    """The shortest exact spelling of a byte count (``536870912`` -> ``"512m"``)."""
    for unit, size in (("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if amount % size == 0:
            return f"{amount // size}{unit}"
    return f"{amount}b"


def read_container(
    value: Any, problems: list[Problem], where: str = "container"
) -> ContainerSpec | None:
    """The :class:`ContainerSpec` of ``value``, or None with a problem for each bad part."""
    if not isinstance(value, dict):
        message = f'expected an object such as {{"image": "alpine:3.20"}}, got {show_value(value)}'
        problems.append(Problem(where, message))
        return None
    before = len(problems)

    def refuse(key: str, message: str) -> None:
        problems.append(Problem(f"{where}.{key}" if key else where, message))

    for key in value:
        if key not in CONTAINER_KEYS:
            refuse(str(key), f"unknown key; expected one of {', '.join(CONTAINER_KEYS)}")
    image = value.get("image")
    if image is None:
        refuse("image", "required: the image to run, such as 'alpine:3.20'")
    elif not isinstance(image, str):
        refuse("image", f"expected a string, got {show_value(image)}")
    elif problem := image_problem(image):
        refuse("image", problem)
    args = _strings(value.get("args"), "args", refuse)
    if args is not None:
        if len(args) > MAX_ARGS:
            refuse("args", f"{len(args):,} arguments; at most {MAX_ARGS:,} are taken")
        size = sum(len(a.encode("utf-8", "surrogatepass")) + 1 for a in args)
        if size > MAX_ARGS_BYTES:
            refuse("args", f"the arguments are {size:,} bytes; at most {MAX_ARGS_BYTES:,}")
    env: dict[str, str] = {}
    raw_env = value.get("env")
    if raw_env is not None and not isinstance(raw_env, dict):
        refuse("env", f"expected an object of strings, got {show_value(raw_env)}")
    for name, item in (raw_env or {}).items() if isinstance(raw_env, dict) else ():
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            refuse(f"env.{name}", "a variable name has letters, digits and '_', no leading digit")
        elif name.upper().startswith("CLOUDTASK_"):
            refuse(f"env.{name}", "CLOUDTASK_* variables are the run's own; choose another name")
        elif not isinstance(item, str):
            refuse(f"env.{name}", f"expected a string, got {show_value(item)}")
        else:
            env[name] = item
    volumes = _strings(value.get("volumes"), "volumes", refuse)
    if volumes is not None:
        if len(volumes) > MAX_VOLUMES:
            refuse("volumes", f"{len(volumes)} volumes; at most {MAX_VOLUMES} are taken")
        targets: set[str] = set()
        for i, volume in enumerate(volumes):
            if problem := volume_problem(volume):
                refuse(f"volumes[{i}]", problem)
            elif (target := volume.split(":")[1].rstrip("/")) in targets:
                refuse(f"volumes[{i}]", f"{target!r} is mounted twice")
            else:
                targets.add(target)
    cpus = value.get("cpus")
    if cpus is not None and (
        isinstance(cpus, bool)
        or not isinstance(cpus, (int, float))
        or not 0 < cpus <= MAX_CPUS
        or math.isnan(cpus)
    ):
        refuse("cpus", f"expected a number more than 0 and at most 1024, got {show_value(cpus)}")
    memory: int | None = None
    if value.get("memory") is not None:
        try:
            memory = parse_memory(value["memory"])
        except ValueError as e:
            refuse("memory", str(e))
    if len(problems) > before:
        return None
    return ContainerSpec(
        image=image,
        args=tuple(args or ()),
        env=env,
        volumes=tuple(volumes or ()),
        cpus=float(cpus) if cpus is not None else None,
        memory=memory,
    )


def _strings(value: Any, key: str, refuse: Any) -> list[str] | None:
    """A list of strings (None for a missing key, and for a bad one: refused)."""
    if value is None:
        return []
    if not isinstance(value, list):
        refuse(key, f"expected a list of strings, got {show_value(value)}")
        return None
    bad = [i for i, item in enumerate(value) if not isinstance(item, str)]
    for i in bad:
        refuse(f"{key}[{i}]", f"expected a string, got {show_value(value[i])}")
    return None if bad else list(value)
