"""The API's task files: the latest version of each, and uploads (multipart or a raw body)."""

from __future__ import annotations

import re
from typing import Any

from flask import current_app, jsonify, request

from cloudtask.exceptions import ValidationError

from ..auth import requires
from ..context import actor, jsonable, ops, store
from ..openapi import Reply, query, ref
from .hardening import ApiError, invalid, too_large
from .table import api


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
