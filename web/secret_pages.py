"""The Secrets page: stored secrets, write-only for people.

Every logged-in user sees the list of names and the tasks using each (a task's definition,
which every viewer reads, already names the secrets it uses). Operators also see each
secret's description, the key it is sealed under, who changed it last and when, and may set
a new secret, replace a value (the same form: a name that is stored is replaced) and delete
one (refused while a task uses it, naming the tasks). Nobody reads a value back: the page
never holds one, the value field is a password input that is never filled in again, not
even after a refused save.

The web process seals a new value with the key ring of its configuration (``secrets.keys``)
and opens none. Without a key ring the page says that secrets cannot be stored here and why,
and the form is not offered. Every change goes through :class:`~cloudtask.operations.
Operations` (audited without the value: ``secret.set``, ``secret.delete``).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for

from cloudtask.exceptions import Conflict, NotFound, ValidationError
from cloudtask.secretbox import SecretError
from cloudtask.store.secrets import secret_name_problem

from .auth import requires
from .context import actor, ops, secret_box, store

bp = Blueprint("secrets", __name__, url_prefix="/secrets")

USERS_SHOWN = 10  # tasks listed per secret; the rest is a count


@bp.after_request
def _no_store(answer: Any) -> Any:
    answer.headers["Cache-Control"] = "no-store"
    return answer


def render_page(
    form: dict[str, str] | None = None,
    errors: dict[str, list[str]] | None = None,
    top_error: str = "",
    status: int = 200,
) -> Any:
    rows = store().list_secrets()
    _, problem = secret_box()
    if form is None:
        name = request.args.get("name", "")[:64]
        current = next((r for r in rows if r["name"] == name), None)
        form = {"name": name, "description": (current or {}).get("description", "")}
    return render_template(
        "secrets/index.html",
        rows=rows,
        form=form,
        errors=errors or {},
        top_error=top_error,
        store_problem=problem,
        users_shown=USERS_SHOWN,
        replacing=any(r["name"] == form["name"] for r in rows),
    ), status


@bp.get("")
@requires("viewer")
def index() -> Any:
    return render_page()


@bp.post("")
@requires("operator")
def save() -> Any:
    """Set a new secret or replace a stored one's value (and description)."""
    name = request.form.get("name", "").strip()
    value = request.form.get("value", "")
    description = request.form.get("description", "").strip()
    form = {"name": name, "description": description}
    box, problem = secret_box()
    try:
        replaced = not secret_name_problem(name) and name in store().stored_secret_names([name])
        info = ops().set_secret(actor(), box, name, value, description)
    except ValidationError as e:
        errors: dict[str, list[str]] = {}
        for p in e.problems:
            errors.setdefault(p.path, []).append(p.message)
        return render_page(form, errors, "The secret was not stored: see the marked fields.", 422)
    except SecretError:
        return render_page(form, None, f"Secrets cannot be stored: {problem}", 503)
    flash(
        f"Secret {info['name']} {'replaced' if replaced else 'stored'} (sealed under key "
        f"{info['key_id']}). Its value is not shown again.",
        "ok",
    )
    return redirect(url_for("secrets.index"))


@bp.route("/<name>/delete", methods=["GET", "POST"])
@requires("operator")
def delete(name: str) -> Any:
    """GET: the confirmation page (a value deleted is gone for good); POST: delete."""
    if secret_name_problem(name):
        return render_page(None, None, f"No secret named {name[:100]!r}.", 404)
    if request.method == "GET":
        try:
            info = store().get_secret_info(name)
        except NotFound as e:
            return render_page(None, None, f"{e}.", 404)
        return render_template("secrets/delete.html", secret=info, users_shown=USERS_SHOWN)
    try:
        ops().delete_secret(actor(), name)
    except NotFound as e:
        return render_page(None, None, f"Not deleted: {e}.", 404)
    except Conflict as e:
        return render_page(
            None,
            None,
            f"Not deleted: {e}. Change those tasks to use another secret first.",
            409,
        )
    flash(f"Secret {name} deleted.", "ok")
    return redirect(url_for("secrets.index"))
