"""Task file pages: the list with an upload form, one file's versions, rollback, download.

Every upload is a new version of its name (the store keeps the newest ``web.file_versions_kept``
of each name, and every version a task pins). A task follows the latest version of its file or
pins one by sha256 in the task form; these pages show who follows and who pins what, and let an
operator roll a file back to an older version (stored again as a new upload of those bytes).

Bad input is shown next to its field and answered 400 (no file chosen) or 422 (a bad name, an
archive with an unsafe member, over the size limit); a body over the server's limit is
answered 413 by the app's error page before the view runs.
"""

from __future__ import annotations

import io
import re
from typing import Any

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)

from cloudtask.exceptions import Conflict, NotFound, ValidationError
from cloudtask.task import file_name_problem

from .auth import requires
from .context import actor, ops, store

bp = Blueprint("files", __name__, url_prefix="/files")

LIST_TASK_NAMES = 5  # task names shown per file on the list page (then "and N more")
LIST_TASKS_READ = 300  # above this many tasks using files, the list page shows counts only
DETAIL_TASKS = 500  # tasks listed on a file's page
SHA256 = re.compile(r"[0-9a-f]{64}")


# --- helpers ----------------------------------------------------------------------------------


def size_text(size: Any) -> str:
    """A byte count for people: ``812 B``, ``14.2 KiB``, ``3.5 MiB``."""
    if not isinstance(size, (int, float)):
        return "–"
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024 or unit == "MiB":
            break
        value /= 1024
    # a no-break space: the number and its unit stay on one line in a narrow column
    if unit == "B":
        return f"{int(value)}\u00a0B"
    return f"{value:.1f}\u00a0{unit}" if value < 100 else f"{value:.0f}\u00a0{unit}"


def client_file_name(raw: str) -> str:
    """The base name of the file name a browser sent (some send a whole Windows path)."""
    return re.split(r"[\\/]", raw or "")[-1].strip()


def download_name(name: str) -> str:
    """A file name safe in a Content-Disposition header on any system: unusual characters
    become ``_`` (the stored name is already a plain file name)."""
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip(".")
    return safe or "file"


def _settings() -> tuple[int, int]:
    """(versions kept per name, upload limit in bytes) from the CloudTask config."""
    web = current_app.config["CLOUDTASK"].web
    return web.file_versions_kept, web.max_upload_bytes


@bp.context_processor
def _template_helpers() -> dict[str, Any]:
    return {"size_text": size_text}


# --- list and upload --------------------------------------------------------------------------


def render_list(
    errors: dict[str, str] | None = None, name: str = "", status: int = 200
) -> tuple[str, int]:
    files = store().list_files()
    counts = store().file_task_counts() if files else {}
    users: dict[str, list[dict[str, Any]]] = {}
    if 0 < sum(counts.values()) <= LIST_TASKS_READ:
        # few enough to name a few per file; otherwise the counts say it (names on each page)
        for task in store().file_tasks(None, limit=LIST_TASKS_READ):
            shown = users.setdefault(task["file"], [])
            if len(shown) < LIST_TASK_NAMES:
                shown.append(task)
    kept, limit = _settings()
    return render_template(
        "files/list.html",
        files=files,
        counts=counts,
        users=users,
        errors=errors or {},
        name=name,
        kept=kept,
        limit=limit,
    ), status


@bp.get("")
@requires("viewer")
def index() -> Any:
    return render_list(name=(request.args.get("name") or "").strip())


@bp.post("")
@requires("operator")
def upload() -> Any:
    """Store the chosen file as a new version, under the name field or its own base name."""
    given = (request.form.get("name") or "").strip()
    chosen = request.files.get("file")
    if chosen is None or not chosen.filename:
        return render_list({"file": "choose a file to upload"}, given, 400)
    name = given or client_file_name(chosen.filename)
    field = "name" if given else "file"
    if not name:
        return render_list(
            {"file": "the chosen file has no name: give one in the name field"}, given, 422
        )
    if problem := file_name_problem(name):
        hint = "" if given else "; give another name in the name field"
        return render_list({field: problem + hint}, given, 422)
    kept, limit = _settings()
    data = chosen.read(limit + 1)  # one byte more than allowed is enough to refuse it
    try:
        meta = ops().put_file(actor(), name, data, keep=kept, max_bytes=limit)
    except ValidationError as e:
        errors: dict[str, str] = {}
        for p in e.problems:
            key = field if p.path == "name" else "file"
            errors[key] = f"{errors[key]}; {p.message}" if key in errors else p.message
        return render_list(errors, given, 422)
    if meta["created"]:
        flash(f"Stored {name}: version {meta['sha256'][:12]}, {size_text(meta['size'])}.", "ok")
    else:
        flash(f"{name}: these bytes are the latest version already; nothing changed.", "ok")
    return redirect(url_for("files.detail", name=name))


# --- one file ---------------------------------------------------------------------------------


def render_detail(name: str, error: str = "", status: int = 200) -> tuple[str, int]:
    try:
        versions = store().list_file_versions(name)
    except NotFound:
        abort(404, description=f"no stored file named {name!r}")
    tasks = store().file_tasks(name, limit=DETAIL_TASKS)
    total = len(tasks)
    if total >= DETAIL_TASKS:
        total = store().file_task_counts(name).get(name, total)
    stored = {v["sha256"] for v in versions}
    task_ids = {t["name"]: t["id"] for t in tasks}
    return render_template(
        "files/detail.html",
        name=name,
        versions=versions,
        latest=versions[0],
        stored=stored,
        tasks=tasks,
        total_tasks=total,
        task_ids=task_ids,
        error=error,
        kept=_settings()[0],
    ), status


@bp.get("/<name>")
@requires("viewer")
def detail(name: str) -> Any:
    return render_detail(name)


@bp.post("/<name>/rollback")
@requires("operator")
def rollback(name: str) -> Any:
    """Make an older version (form field ``sha256``) the latest again."""
    sha256 = (request.form.get("sha256") or "").strip().lower()
    if not SHA256.fullmatch(sha256):
        return render_detail(name, "sha256: expected the sha256 of a stored version", 422)
    try:
        ops().rollback_file(actor(), name, sha256, keep=_settings()[0])
    except Conflict as e:
        return render_detail(name, str(e), 409)
    except NotFound as e:
        if "has no stored version" not in str(e):
            abort(404, description=str(e))
        return render_detail(name, str(e), 422)
    flash(f"{name} rolled back: version {sha256[:12]} is the latest again.", "ok")
    return redirect(url_for("files.detail", name=name))


@bp.get("/<name>/<sha256>/download")
@requires("viewer")
def download(name: str, sha256: str) -> Any:
    if not SHA256.fullmatch(sha256):
        abort(404, description=f"{sha256!r} is not the sha256 of a file version")
    try:
        meta, data = store().read_file_version(name, sha256)
    except NotFound as e:
        abort(404, description=str(e))
    return download_reply(meta, data)


def download_reply(meta: dict[str, Any], data: bytes) -> Any:
    """A version's bytes as a download (the page's and the API's): never shown inline,
    whatever they hold, and checked again before a cached copy is used."""
    response = send_file(
        io.BytesIO(data),
        mimetype="application/octet-stream",
        as_attachment=True,
        download_name=download_name(meta["name"]),
        etag=meta["sha256"],
        max_age=0,
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-cache"
    return response
