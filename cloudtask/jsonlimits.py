"""JSON from people, read with a bound on its nesting.

Python's ``json`` module reads nesting by recursion: a document of 100,000 ``[`` raises
``RecursionError`` (a traceback, an HTTP 500), and one nested a few hundred levels deep is read
but then costs every walk over it. Nothing CloudTask takes is nested deeply (a task spec's
deepest legitimate part is an ``http.body`` object), so what people send is refused beyond
:data:`MAX_JSON_DEPTH` levels, *before* it is parsed, with an error saying where:

* :func:`loads` is ``json.loads`` for text from outside (task files, the web form's JSON
  editor, the schedule preview, API bodies): a :class:`JSONDepthError` (a ``ValueError``,
  like ``json.JSONDecodeError``, so callers that catch that already catch this) beyond the
  limit, and never a ``RecursionError``;
* :func:`depth_problem` says where an already parsed value is too deep (a path such as
  ``http.body.a[0]``), without recursion (``cloudtask.task`` checks every spec with it).

Example::

    try:
        spec = loads(text)
    except ValueError as e:  # not JSON, or nested too deeply
        print(f"not usable JSON: {e}")
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_JSON_DEPTH = 32

# a JSON string (escapes included) or one bracket: strings are skipped, brackets counted
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_OPENERS = frozenset("[{")


class JSONDepthError(ValueError):
    """JSON nested more deeply than allowed. ``line`` and ``column`` (1-based) are where the
    bracket that went past the limit stands."""

    def __init__(self, limit: int, line: int, column: int) -> None:
        super().__init__(
            f"nested more than {limit} levels deep (line {line}, column {column}); "
            f"at most {limit} levels of objects and lists are taken"
        )
        self.limit, self.line, self.column = limit, line, column


def check_depth(text: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise :class:`JSONDepthError` when ``text`` opens more than ``limit`` objects or lists
    inside each other. One pass over the text, without parsing it; text that is not JSON is
    left for the parser to refuse (an unterminated string may be counted as brackets, so its
    error may be this one)."""
    if text.count("[") + text.count("{") <= limit:  # the common case: nothing to count
        return
    depth = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in _OPENERS:
            depth += 1
            if depth > limit:
                start = match.start()
                line = text.count("\n", 0, start) + 1
                column = start - (text.rfind("\n", 0, start) + 1) + 1
                raise JSONDepthError(limit, line, column)
        elif token in ("]", "}"):
            depth = max(0, depth - 1)


def loads(text: str | bytes, limit: int = MAX_JSON_DEPTH, **options: Any) -> Any:
    """``json.loads(text, **options)`` for text from outside: :class:`JSONDepthError` beyond
    ``limit`` levels (checked before parsing), ``json.JSONDecodeError`` for what is not JSON;
    both are ``ValueError``. Bytes must be UTF-8 (a ``UnicodeDecodeError``, a ValueError too)."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")
    check_depth(text, limit)
    try:
        return json.loads(text, **options)
    except RecursionError:  # a parse hook that nests on its own: still never a traceback
        raise JSONDepthError(limit, 1, 1) from None


def _key(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def depth_problem(value: Any, limit: int = MAX_JSON_DEPTH, path: str = "") -> str | None:
    """The path of the first object or list in ``value`` nested more than ``limit`` levels
    deep (the value itself, when a container, is level 1), or None. Iterative: any depth is
    walked without recursion. ``path`` is the value's own path (``""`` for a document)."""
    if not isinstance(value, (dict, list)):
        return None
    stack: list[tuple[Any, str, int]] = [(value, path, 1)]
    while stack:
        item, where, depth = stack.pop()
        if depth > limit:
            return where
        if isinstance(item, dict):
            for key, child in item.items():
                if isinstance(child, (dict, list)):
                    stack.append((child, _key(where, key), depth + 1))
        else:
            for i, child in enumerate(item):
                if isinstance(child, (dict, list)):
                    stack.append((child, f"{where}[{i}]", depth + 1))
    return None
