"""How the API reads what it is sent: bodies, headers and query arguments, never trusted.

A body must be a JSON object of at most a limit of bytes, UTF-8, with integers MongoDB can
store, finite numbers, no lone surrogates and at most ``MAX_JSON_DEPTH`` levels; anything else
is a 400 or a 413 saying what is wrong. Query arguments and headers are checked the same way
(422 naming the argument). Every refusal is an :class:`ApiError`, answered by
:func:`api_error` as ``{"error": ..., "details": [{"path": ..., "message": ...}]}``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from flask import jsonify, request

from cloudtask.exceptions import Problem, ValidationError

JSON_BODY_LIMIT = 1024 * 1024  # a task spec is a few KiB
CALLBACK_BODY_LIMIT = 64 * 1024
MESSAGE_LIMIT = 2000  # characters of a callback's message
MAX_JSON_DEPTH = 32
MAX_JSON_INT = 2**63 - 1  # what MongoDB stores
_IF_MATCH = re.compile(r'(?:W/)?"?([0-9]{1,18})"?')
_REVISION = re.compile(r"[0-9]{1,18}")
_TRUE, _FALSE = ("true", "1"), ("false", "0")


class ApiError(Exception):
    """An answer other than success: status, message, and the problems (path, message)."""

    def __init__(self, status: int, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = problems or []


def api_error(error: ApiError) -> Any:
    """The API blueprint's handler of :class:`ApiError`."""
    return jsonify(error=error.message, details=[p.to_dict() for p in error.problems]), error.status


def invalid(message: str, path: str, problem: str) -> ApiError:
    return ApiError(422, message, [Problem(path, problem)])


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is too large: at most {limit} bytes")


# --- bodies -----------------------------------------------------------------------------------


def _json_int(text: str) -> int:
    value = int(text) if len(text) <= 20 else None  # longer: too large, whatever the digits
    if value is None or abs(value) > MAX_JSON_INT:
        raise ValueError(f"the number {text[:20]}... is too large (at most {MAX_JSON_INT})")
    return value


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_json(value: Any, depth: int = 0) -> None:
    """Refuse what JSON parses but nothing stores: deep nesting, lone surrogates."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, str):
        value.encode("utf-8")  # a lone surrogate ("\ud800") raises UnicodeEncodeError
    elif isinstance(value, dict):
        for key, item in value.items():
            key.encode("utf-8")
            _check_json(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json(item, depth + 1)


def json_body(limit: int = JSON_BODY_LIMIT) -> dict[str, Any]:
    """The request's body, a JSON object, or an ApiError (400, 413) that says what is wrong."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    raw = request.get_data(cache=True)
    if len(raw) > limit:
        raise too_large(limit)
    if not raw.strip():
        raise ApiError(400, "the body is empty: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not UTF-8 text: {e}") from None
    try:
        value = json.loads(
            text,
            parse_int=_json_int,
            parse_float=_json_float,
            parse_constant=_json_constant,
        )
        _check_json(value)
    except RecursionError:
        raise ApiError(400, "the body is not usable JSON: nested too deeply") from None
    except (ValueError, UnicodeEncodeError) as e:
        raise ApiError(400, f"the body is not usable JSON: {e}") from None
    if not isinstance(value, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean"}.get(type(value), "a number")
        if value is None:
            kind = "null"
        raise ApiError(400, f"the body must be a JSON object, got {kind}")
    return value


def unknown_keys(body: dict[str, Any], allowed: tuple[str, ...], problems: list[Problem]) -> None:
    """A problem for each key of ``body`` not in ``allowed``."""
    for key in body:
        if key not in allowed:
            problems.append(Problem(key, f"unknown key; expected one of {', '.join(allowed)}"))


# --- headers and query arguments --------------------------------------------------------------


def expected_revision() -> int | None:
    """The revision a change expects (``If-Match: "3"`` or ``?revision=3``), or None."""
    problems: list[Problem] = []
    revision = None
    raw = request.headers.get("If-Match")
    if raw not in (None, "", "*"):
        match = _IF_MATCH.fullmatch(raw)
        if match:
            revision = int(match[1])
        else:
            problems.append(
                Problem("If-Match", f'expected the task\'s revision, such as "3", got {raw[:40]!r}')
            )
    arg = request.args.get("revision")
    if arg not in (None, ""):
        if not _REVISION.fullmatch(arg) or int(arg) < 1:
            problems.append(Problem("revision", f"expected a revision number, got {arg[:40]!r}"))
        elif revision is not None and int(arg) != revision:
            problems.append(Problem("revision", "differs from the If-Match header"))
        else:
            revision = int(arg)
    if problems:
        raise ApiError(422, "the expected revision is invalid", problems)
    return revision


def flag_arg(name: str) -> bool:
    raw = request.args.get(name)
    if raw in (None, ""):
        return False
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise invalid(f"{name} is invalid", name, f"expected true or false, got {raw[:40]!r}")


def checked(read: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """The filters read by ``read`` (web.queries), or 422 naming each bad argument."""
    try:
        return read(request.args)
    except ValidationError as e:
        raise ApiError(422, "the query arguments are invalid", e.problems) from None
