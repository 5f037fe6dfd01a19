"""Helpers shared by the tests: ``from helpers import wait_for``.

``tests/`` has no ``__init__.py``, so pytest (default "prepend" import mode) puts this folder
on ``sys.path`` when it loads ``tests/conftest.py``; test modules import this file by name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "",
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy value.

    Returns that value. Raises AssertionError (with ``message``) after ``timeout`` seconds;
    the predicate is always called once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f": {message}" if message else ""
            raise AssertionError(
                f"condition not met within {timeout:g} s{detail} (last value: {value!r})"
            )
        time.sleep(interval)
