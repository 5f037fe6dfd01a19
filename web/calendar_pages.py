"""The Calendars page: holiday calendars and blackout windows, read by everyone, changed by
operators.

One page lists both, each calendar with its weekdays, how many dates it holds, the next ones
and the tasks naming it, each blackout with its group, its window, and whether it is open now
or when it opens next. Operators get three forms on it: a calendar (weekdays and dates typed
in, ranges ``A..B`` too), a calendar imported from an iCalendar file (the holidays a
company's calendar exports), and a blackout window (weekly or on dates from one local time to
another, or once from a start to an end). ``?calendar=NAME`` and ``?blackout=NAME`` fill a
form with the stored one to change it; a name that is stored is replaced. Deleting asks first
(a calendar is refused while a task names it, and the answer names the tasks).

Everything goes through :class:`~cloudtask.operations.Operations`, as the API and the CLI do:
the same validation (a refused form keeps what was typed and marks the fields), the same
audit entries, the same change counter the agents follow.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for

from cloudtask.calendars import (
    MAX_ICS_BYTES,
    WEEKDAYS,
    Blackout,
    CalendarBook,
    describe_blackout,
)
from cloudtask.clock import utcnow
from cloudtask.exceptions import CloudTaskError, Conflict, NotFound, Problem, ValidationError
from cloudtask.schedules import NAME_PATTERN

from .auth import requires
from .context import actor, ops, store

bp = Blueprint("calendars", __name__, url_prefix="/calendars")

NEXT_DATES = 5  # upcoming dates shown per calendar
USERS_SHOWN = 10  # tasks listed per calendar; the rest is a count
_SPLIT = re.compile(r"[\s,;]+")


def _split(text: str) -> list[str]:
    return [part for part in _SPLIT.split(text or "") if part]


def _errors(problems: list[Problem]) -> dict[str, list[str]]:
    """Problems by form field: ``dates[3]`` marks ``dates``, a problem of the whole on top."""
    out: dict[str, list[str]] = {}
    for p in problems:
        field = re.split(r"[.\[]", p.path or "", maxsplit=1)[0]
        out.setdefault(field or "_", []).append(p.message)
    return out


def _calendar_rows(today: date) -> list[dict[str, Any]]:
    rows = []
    users = store().calendar_users()
    for item in store().list_calendars(with_dates=True):
        upcoming = [d for d in item.pop("dates") if d >= today.isoformat()]
        item["next_dates"] = upcoming[:NEXT_DATES]
        item["more_dates"] = max(0, len(upcoming) - NEXT_DATES)
        item["used_by"] = users.get(item["name"], [])
        rows.append(item)
    return rows


def blackout_rows() -> list[dict[str, Any]]:
    """Every blackout with its summary, the end of its window open now (``open_until``;
    touching windows joined) or its next opening (``next_opening``)."""
    now = utcnow()
    rows = []
    for doc in store().list_blackouts():
        doc["summary"] = describe_blackout(doc)
        window = Blackout.from_doc(doc)
        # (its own windows that touch are followed: sat 22:00-24:00, then sun 00:00-06:00)
        doc["open_until"] = CalendarBook(blackouts=(window,)).blackout_end(window.group, now)
        doc["next_opening"] = None if doc["open_until"] else window.next_opening(now)
        rows.append(doc)
    return rows


def _calendar_form(name: str) -> dict[str, Any]:
    form: dict[str, Any] = {"name": name, "description": "", "weekdays": [], "dates": ""}
    if name:
        try:
            doc = store().get_calendar(name)
        except NotFound:
            return form
        form.update(
            description=doc.get("description") or "",
            weekdays=doc.get("weekdays") or [],
            dates="\n".join(doc.get("dates") or []),
        )
    return form


def _blackout_form(name: str) -> dict[str, Any]:
    form: dict[str, Any] = {
        "name": name,
        "group": "*",
        "kind": "weekly",
        "days": [],
        "dates": "",
        "from": "",
        "to": "",
        "start": "",
        "end": "",
        "timezone": "UTC",
        "description": "",
    }
    if name:
        try:
            doc = store().get_blackout(name)
        except NotFound:
            return form
        form.update(
            group=doc.get("group") or "*",
            kind="once" if doc.get("start") else "weekly",
            days=doc.get("days") or [],
            dates="\n".join(doc.get("dates") or []),
            start=(doc.get("start") or "")[:16],
            end=(doc.get("end") or "")[:16],
            timezone=doc.get("timezone") or "UTC",
            description=doc.get("description") or "",
            **{"from": doc.get("from") or "", "to": doc.get("to") or ""},
        )
    return form


def render_page(
    *,
    calendar: dict[str, Any] | None = None,
    blackout: dict[str, Any] | None = None,
    imported: dict[str, Any] | None = None,
    errors: dict[str, dict[str, list[str]]] | None = None,
    top_error: str = "",
    status: int = 200,
) -> Any:
    """The page; a form given is shown as typed (with ``errors`` per form and field)."""
    today = utcnow().date()
    try:
        calendars, blackouts = _calendar_rows(today), blackout_rows()
    except CloudTaskError as e:
        calendars, blackouts = [], []
        top_error = top_error or f"The calendars cannot be read now: {e}"
        status = max(status, 503)
    name_arg = lambda key: (request.args.get(key) or "")[:128]  # noqa: E731
    return render_template(
        "calendars/index.html",
        calendars=calendars,
        blackouts=blackouts,
        calendar=calendar if calendar is not None else _calendar_form(name_arg("calendar")),
        blackout=blackout if blackout is not None else _blackout_form(name_arg("blackout")),
        imported=imported or {"name": "", "timezone": "UTC", "weekdays": [], "description": ""},
        calendar_names={c["name"] for c in calendars},
        blackout_names={b["name"] for b in blackouts},
        errors=errors or {},
        top_error=top_error,
        weekdays=WEEKDAYS,
        users_shown=USERS_SHOWN,
        max_ics_kib=MAX_ICS_BYTES // 1024,
    ), status


def _stored(kind: str, form: dict[str, Any], store_it: Callable[[], tuple[Any, bool]]) -> Any:
    """Store a calendar or blackout from its form: the list with a note, or the form again
    as typed with each problem at its field (the stored one unchanged)."""
    try:
        _, created = store_it()
    except ValidationError as e:
        return render_page(
            **{kind: form},
            errors={kind: _errors(e.problems)},
            top_error=f"The {kind} was not stored: see the marked fields.",
            status=422,
        )
    except Conflict as e:
        return render_page(**{kind: form}, top_error=f"The {kind} was not stored: {e}.", status=409)
    flash(f"{kind.capitalize()} {form['name']} {'created' if created else 'replaced'}.", "ok")
    return redirect(url_for("calendars.index") + f"#{kind}-list")


@bp.get("")
@requires("viewer")
def index() -> Any:
    return render_page()


@bp.post("/calendar")
@requires("operator")
def save_calendar() -> Any:
    """Create or replace a calendar from the form."""
    form = {
        "name": request.form.get("name", "").strip(),
        "description": request.form.get("description", "").strip(),
        "weekdays": request.form.getlist("weekdays"),
        "dates": request.form.get("dates", ""),
    }
    body = {
        "weekdays": form["weekdays"],
        "dates": _split(form["dates"]),
        "description": form["description"],
    }
    return _stored("calendar", form, lambda: ops().set_calendar(actor(), form["name"], body))


@bp.post("/import")
@requires("operator")
def import_calendar() -> Any:
    """Create or replace a calendar with the dates of an uploaded iCalendar file."""
    form = {
        "name": request.form.get("name", "").strip(),
        "timezone": request.form.get("timezone", "").strip() or "UTC",
        "weekdays": request.form.getlist("weekdays"),
        "description": request.form.get("description", "").strip(),
    }

    def refused(problems: list[Problem], why: str, status: int = 422) -> Any:
        return render_page(
            imported=form,
            errors={"import": _errors(problems)},
            top_error=f"The calendar was not imported: {why}",
            status=status,
        )

    if not NAME_PATTERN.fullmatch(form["name"]):
        return refused(
            [Problem("name", "a calendar's name: letters, digits, '_', '.', '-'")],
            "see the marked fields.",
        )
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        return refused([Problem("file", "choose the iCalendar (.ics) file")], "no file chosen.")
    data = upload.read(MAX_ICS_BYTES + 1)
    if len(data) > MAX_ICS_BYTES:
        return refused(
            [Problem("file", f"at most {MAX_ICS_BYTES // 1024} KiB")], "the file is too large.", 413
        )
    filename = re.split(r"[/\\]", upload.filename)[-1]
    try:
        doc, created = ops().import_calendar(
            actor(),
            form["name"],
            data,
            filename=filename,
            timezone=form["timezone"],
            weekdays=form["weekdays"],
            description=form["description"] or None,
        )
    except ValidationError as e:
        # a problem in the file names its line: shown at the file field, with the file's name
        problems = [
            p
            if p.path in ("name", "timezone", "weekdays", "description")
            else Problem("file", str(p))
            for p in e.problems
        ]
        return refused(problems, f"{e.source or 'the calendar'} is refused.")
    except Conflict as e:
        return refused([], f"{e}.", 409)
    count = len(doc.get("dates") or [])
    flash(
        f"Calendar {form['name']} {'created' if created else 'replaced'} from {filename}: "
        f"{count} date{'' if count == 1 else 's'}.",
        "ok",
    )
    return redirect(url_for("calendars.index") + "#calendar-list")


@bp.post("/blackout")
@requires("operator")
def save_blackout() -> Any:
    """Create or replace a blackout window from the form (weekly/dated, or once)."""
    f = request.form
    form = {
        "name": f.get("name", "").strip(),
        "group": f.get("group", "").strip(),  # (empty: refused; "*" is every group)
        "kind": "once" if f.get("kind") == "once" else "weekly",
        "days": f.getlist("days"),
        "dates": f.get("dates", ""),
        "from": f.get("from", "").strip(),
        "to": f.get("to", "").strip(),
        "start": f.get("start", "").strip(),
        "end": f.get("end", "").strip(),
        "timezone": f.get("timezone", "").strip() or "UTC",
        "description": f.get("description", "").strip(),
    }
    body: dict[str, Any] = {
        "group": form["group"],
        "timezone": form["timezone"],
        "description": form["description"],
    }
    if form["kind"] == "once":
        body.update(start=form["start"], end=form["end"])
    else:
        body.update(days=form["days"], dates=_split(form["dates"]))
        body.update({k: form[k] for k in ("from", "to") if form[k]})
    return _stored("blackout", form, lambda: ops().set_blackout(actor(), form["name"], body))


@bp.route("/calendar/<name>/delete", methods=["GET", "POST"])
@requires("operator")
def delete_calendar(name: str) -> Any:
    """GET: what deleting means (refused while tasks name it); POST: delete."""
    try:
        doc = store().get_calendar(name)
    except NotFound:
        return render_page(top_error=f"No calendar named {name[:100]!r}.", status=404)
    users = store().tasks_using_calendar(name)
    if request.method == "GET":
        return render_template(
            "calendars/delete.html",
            kind="calendar",
            item=doc,
            used_by=users,
            users_shown=USERS_SHOWN,
        )
    try:
        ops().delete_calendar(actor(), name)
    except NotFound:
        return render_page(top_error=f"No calendar named {name[:100]!r}.", status=404)
    except Conflict as e:
        return render_page(
            top_error=f"Not deleted: {e}. Change those tasks' schedules first.", status=409
        )
    flash(f"Calendar {name} deleted.", "ok")
    return redirect(url_for("calendars.index") + "#calendar-list")


@bp.route("/blackout/<name>/delete", methods=["GET", "POST"])
@requires("operator")
def delete_blackout(name: str) -> Any:
    """GET: the confirmation; POST: delete (fires of its group start again in its hours)."""
    try:
        doc = store().get_blackout(name)
    except NotFound:
        return render_page(top_error=f"No blackout named {name[:100]!r}.", status=404)
    if request.method == "GET":
        doc["summary"] = describe_blackout(doc)
        return render_template(
            "calendars/delete.html", kind="blackout", item=doc, used_by=[], users_shown=0
        )
    try:
        ops().delete_blackout(actor(), name)
    except NotFound:
        return render_page(top_error=f"No blackout named {name[:100]!r}.", status=404)
    flash(f"Blackout {name} deleted.", "ok")
    return redirect(url_for("calendars.index") + "#blackout-list")
