"""The API's task files: the latest version of each, uploads (multipart or a raw body), one
file's versions and the tasks using it, the bytes of a version (or of the latest), and
rollback to an older version (stored again as a new upload of its bytes, like the files
page does)."""

from __future__ import annotations

import re
from typing import Any

from flask import current_app, jsonify, request, url_for

from cloudtask.exceptions import NotFound, Problem, ValidationError

from ..auth import requires
from ..context import actor, jsonable, ops, store
from ..files import DETAIL_TASKS, SHA256, download_reply
from ..openapi import JSON, Reply, path_param, query, ref
from .hardening import ApiError, invalid, json_body, too_large, unknown_keys
from .table import api

NAME_PARAM = path_param("name", "The file's name")
SHA_PARAM = path_param("sha256", "The sha256 of one of its stored versions")
BYTES_HEADERS = {
    "Content-Disposition": "attachment; filename=<the file's name, unusual characters as _>",
    "ETag": "The version's sha256",
}


@api.route(
    "GET",
    "/files",
    summary="Task files",
    description="The latest version of each stored file.",
    replies={200: Reply("The files, by name", "FileList")},
)
@requires("viewer")
def list_files() -> Any:
    return jsonify(items=jsonable(store().list_files()))


def _file_name(given: str | None, fallback: str) -> str:
    if given not in (None, ""):
        return given
    # a browser may send a path: keep its last part (the name is then checked like any)
    return re.split(r"[/\\]", fallback or "")[-1]


@api.route(
    "POST",
    "/files",
    summary="Upload a task file",
    description="A script, a binary, or a .zip/.tar.gz package: the multipart field `file` "
    "(and `name`, else the file's own name), or the raw body with `?name=`. A new version "
    "of the file; the bytes of the latest version again add none (200).",
    params=(query("name", {"type": "string"}, "The file's name (a raw body needs it)"),),
    body={
        "multipart/form-data": ref("Upload"),
        "application/octet-stream": {"type": "string", "format": "binary"},
    },
    replies={
        201: Reply("The new version", "File"),
        200: Reply("Unchanged: the latest version holds these bytes", "File"),
    },
    errors=(422,),
)
@requires("operator")
def upload_file() -> Any:
    cfg = current_app.config["CLOUDTASK"]
    limit = cfg.web.max_upload_bytes
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise too_large(limit)
    if request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        upload = request.files.get("file")
        if upload is None:
            raise invalid("the upload is invalid", "file", "required: the file's contents")
        name = _file_name(request.form.get("name") or request.args.get("name"), upload.filename)
        data = upload.read(limit + 1)
    else:
        name = request.args.get("name") or ""
        data = request.get_data(cache=False)
    if len(data) > limit:
        raise too_large(limit)
    if not name:
        raise invalid("the upload is invalid", "name", "required: the file's name")
    try:
        info = ops().put_file(actor(), name, data, keep=cfg.web.file_versions_kept, max_bytes=limit)
    except ValidationError as e:
        raise ApiError(422, f"the file {name[:100]!r} is refused", e.problems) from None
    created = info.get("created", True)
    return jsonify(jsonable(info)), 201 if created else 200


# --- one file ---------------------------------------------------------------------------------


def _versions(name: str) -> list[dict[str, Any]]:
    try:
        versions = store().list_file_versions(name)
    except NotFound:
        raise ApiError(404, f"no stored file named {name[:100]!r}") from None
    return [version_json(v) for v in versions]


def version_json(meta: dict[str, Any]) -> dict[str, Any]:
    out = jsonable(meta)
    out.pop("version", None)  # the document's schema version, not the file's
    return out


@api.route(
    "GET",
    "/files/<name>",
    summary="One task file",
    description="Its latest version, every stored version (newest first, with the tasks "
    "pinning each) and the tasks using the file (`file_version` null: it follows the latest).",
    params=(NAME_PARAM,),
    replies={200: Reply("The file", "FileDetail")},
    errors=(404,),
)
@requires("viewer")
def get_file(name: str) -> Any:
    versions = _versions(name)
    tasks = store().file_tasks(name, limit=DETAIL_TASKS)
    total = len(tasks)
    if total >= DETAIL_TASKS:
        total = store().file_task_counts(name).get(name, total)
    return jsonify(
        name=name,
        latest=versions[0],
        versions=versions,
        tasks=[jsonable({k: t[k] for k in ("id", "name", "file_version")}) for t in tasks],
        total_tasks=total,
    )


@api.route(
    "GET",
    "/files/<name>/versions",
    summary="A task file's versions",
    description="Newest first: sha256, size, who uploaded it and when, whether it is the "
    "latest, the tasks pinning it, and for a rollback the version it replaced "
    "(`rolled_back_from`). The same bytes appear twice after a rollback.",
    params=(NAME_PARAM,),
    replies={200: Reply("The versions", "FileVersionList")},
    errors=(404,),
)
@requires("viewer")
def list_file_versions(name: str) -> Any:
    return jsonify(items=_versions(name))


@api.route(
    "GET",
    "/files/<name>/download",
    summary="Download a task file (its latest version)",
    params=(NAME_PARAM,),
    replies={200: Reply("The bytes", "Binary", BYTES_HEADERS, "application/octet-stream")},
    errors=(404,),
)
@requires("viewer")
def download_file(name: str) -> Any:
    try:
        meta = store().latest_file(name)
        meta, data = store().read_file_version(name, meta["sha256"])
    except (NotFound, ValidationError):
        raise ApiError(404, f"no stored file named {name[:100]!r}") from None
    return download_reply(meta, data)


@api.route(
    "GET",
    "/files/<name>/versions/<sha256>/download",
    summary="Download one version of a task file",
    params=(NAME_PARAM, SHA_PARAM),
    replies={200: Reply("The bytes", "Binary", BYTES_HEADERS, "application/octet-stream")},
    errors=(404,),
)
@requires("viewer")
def download_file_version(name: str, sha256: str) -> Any:
    if not SHA256.fullmatch(sha256):
        raise ApiError(404, f"{sha256[:80]!r} is not the sha256 of a file version")
    try:
        meta, data = store().read_file_version(name, sha256)
    except (NotFound, ValidationError) as e:
        raise ApiError(404, str(e)[:300]) from None
    return download_reply(meta, data)


@api.route(
    "POST",
    "/files/<name>/rollback",
    summary="Roll a task file back to an older version",
    description='`{"sha256": "..."}`: that version\'s bytes are stored again as the newest '
    "upload (`rolled_back_from` names the version it replaces), so tasks following the "
    "latest run it from their next run. 409 when it is the latest already.",
    params=(NAME_PARAM,),
    body={JSON: ref("Rollback")},
    replies={201: Reply("The new latest version", "FileVersion", {"Location": "Its versions"})},
    errors=(404, 409, 422),
)
@requires("operator")
def rollback_file(name: str) -> Any:
    _versions(name)  # 404 for no such file, before the body is read
    body = json_body()
    problems: list[Problem] = []
    unknown_keys(body, ("sha256",), problems)
    sha256 = body.get("sha256")
    if not isinstance(sha256, str) or not SHA256.fullmatch(sha256.strip().lower()):
        problems.append(Problem("sha256", "expected the sha256 of a stored version (64 hex)"))
    if problems:
        raise ApiError(422, "the rollback is invalid", problems)
    sha256 = sha256.strip().lower()
    keep = current_app.config["CLOUDTASK"].web.file_versions_kept
    try:
        meta = ops().rollback_file(actor(), name, sha256, keep=keep)  # Conflict: 409
    except NotFound as e:
        if "has no stored version" not in str(e):
            raise ApiError(404, str(e)) from None
        raise ApiError(422, "the rollback is invalid", [Problem("sha256", str(e))]) from None
    answer = jsonify(version_json({**meta, "latest": True}))
    answer.headers["Location"] = url_for("api.list_file_versions", name=name)
    return answer, 201
