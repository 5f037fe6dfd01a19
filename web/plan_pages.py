"""The Plans pages: plans other systems submitted, their progress and items; cancelling.

Plans are submitted through the API (``POST /api/v1/plans``) or ``cloudtask plan submit``;
the site only shows them and, for operators, cancels them.

* ``GET /plans``: the latest plans, newest first (:data:`PLANS_PER_PAGE` a page): name,
  submitter, created, a progress bar (the share of items in a final state, coloured by
  succeeded / failed / other), the counts by state, and whether it is open, done or cancelled.
* ``GET /plans/<plan_id>``: the plan's facts, its progress bar, its counts by state as
  filter links (``?state=failed``) and its items, :data:`ITEMS_PER_PAGE` a page, each linking
  to the run page of its latest attempt.
* ``POST /plans/<plan_id>/cancel`` and ``POST /plans/items/<item_id>/cancel`` (operators):
  through :class:`~cloudtask.operations.Operations` (audited), then back to the plan page with
  a message saying what was dropped and what is being killed. A Conflict (killing needs
  ZooKeeper and this site has none, the item is over) is a flash error, never a 500.

Every value is shown through Jinja's autoescaping. The progress bar is an inline SVG whose
segments are sized by attributes, not by ``style`` (the site's Content-Security-Policy allows
no inline style).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for

from cloudtask.exceptions import Conflict, NotFound
from cloudtask.runmodel import FINISHED_STATUSES
from cloudtask.store.queries import Page

from .api.plans import ITEM_STATES
from .auth import requires
from .context import actor, ops, store
from .queries import choice_arg, int_arg

bp = Blueprint("plans", __name__, url_prefix="/plans")

PLANS_PER_PAGE = 25
MAX_LIST_PAGE = 40  # the list reaches back 1,000 plans
ITEMS_PER_PAGE = 200
# how the progress bar colours the items in a final state (an item is only ever "failed",
# "timed_out" or "lost" once it has no attempt left: before that it is "retrying")
OK_STATES = ("succeeded",)
BAD_STATES = ("failed", "timed_out", "lost")
FINAL_STATES = FINISHED_STATUSES
OTHER_STATES = tuple(s for s in FINAL_STATES if s not in OK_STATES + BAD_STATES)
# an item whose latest attempt is one of these can be cancelled (dropped or killed)
CANCELLABLE_STATES = ("queued", "claimed", "running")


def progress(plan: dict[str, Any]) -> dict[str, Any]:
    """The progress bar of a plan (from its ``counts`` and ``total``): how many items are
    final, split into succeeded, failed and other, each with its share in percent and the
    SVG segment (``x``, ``width`` on a 0-100 scale)."""
    counts = plan.get("counts") or {}
    total = int(plan.get("total") or 0)
    parts = [
        ("ok", "succeeded", sum(counts.get(s, 0) for s in OK_STATES)),
        ("bad", "failed", sum(counts.get(s, 0) for s in BAD_STATES)),
        ("other", "ended otherwise", sum(counts.get(s, 0) for s in OTHER_STATES)),
    ]
    final = sum(n for _, _, n in parts)
    segments, x = [], 0.0
    for css, label, n in parts:
        width = 100.0 * n / total if total else 0.0
        if n:
            segments.append({"css": css, "label": label, "n": n, "x": x, "width": width})
        x += width
    percent = 100.0 * final / total if total else 0.0
    return {
        "total": total,
        "final": final,
        "open": total - final,
        "percent": percent,
        "percent_text": f"{percent:.0f} %" if final in (0, total) else f"{percent:.1f} %",
        "segments": segments,
        "title": f"{final} of {total} items final: "
        + ", ".join(f"{n} {label}" for _, label, n in parts),
    }


def plan_state(plan: dict[str, Any]) -> str:
    """``cancelled``, ``done`` (every item final) or ``open``."""
    if plan.get("cancelled_at"):
        return "cancelled"
    return "done" if plan.get("done") else "open"


def ordered_counts(counts: dict[str, int]) -> list[tuple[str, int]]:
    """The counts by state in the order of :data:`ITEM_STATES` (a state with none left out)."""
    known = [(s, counts[s]) for s in ITEM_STATES if counts.get(s)]
    return known + sorted((s, n) for s, n in counts.items() if s not in ITEM_STATES and n)


def plan_label(plan: dict[str, Any]) -> str:
    return plan.get("name") or plan["_id"]


@bp.context_processor
def _template_helpers() -> dict[str, Any]:
    return {
        "plan_progress": progress,
        "plan_state": plan_state,
        "ordered_counts": ordered_counts,
        "plan_label": plan_label,
        "cancellable_states": CANCELLABLE_STATES,
    }


def _get_plan(plan_id: str) -> dict[str, Any]:
    try:
        return store().get_plan(plan_id)
    except NotFound:
        abort(404, description=f"no plan with id {plan_id[:100]!r}")


# --- list -------------------------------------------------------------------------------------


@bp.get("")
@requires("viewer")
def index() -> Any:
    problems: list[Any] = []
    number = int_arg(request.args, "page", 1, 1, MAX_LIST_PAGE, problems)
    skip = (number - 1) * PLANS_PER_PAGE
    latest = store().list_plans(limit=skip + PLANS_PER_PAGE + 1)
    more = len(latest) > skip + PLANS_PER_PAGE
    shown = latest[skip : skip + PLANS_PER_PAGE]
    # the counts of each plan shown (one read of its items' latest attempts per plan)
    plans = [_with_counts(p) for p in shown]
    more = more and number < MAX_LIST_PAGE
    page = Page(  # the total is a lower bound ("page 2 of 3+") while more plans are there
        items=plans,
        page=number,
        per_page=PLANS_PER_PAGE,
        total=len(latest) if more else skip + len(shown),
        capped=more,
    )
    errors = {p.path: p.message for p in problems}
    return render_template("plans/list.html", page=page, errors=errors), (422 if problems else 200)


def _with_counts(plan: dict[str, Any]) -> dict[str, Any]:
    try:
        full = store().get_plan(plan["_id"])
    except NotFound:  # deleted between the two reads
        full = {**plan, "counts": {}, "total": 0, "done": False}
    return full


# --- one plan ---------------------------------------------------------------------------------


@bp.get("/<plan_id>")
@requires("viewer")
def detail(plan_id: str) -> Any:
    plan = _get_plan(plan_id)
    problems: list[Any] = []
    state = choice_arg(request.args, "state", ITEM_STATES, problems)
    number = int_arg(request.args, "page", 1, 1, 1_000_000, problems)
    try:
        items = store().plan_items(plan_id, state)
    except NotFound:
        abort(404, description=f"no plan with id {plan_id[:100]!r}")
    pages = max(1, -(-len(items) // ITEMS_PER_PAGE))
    number = min(number, pages)
    start = (number - 1) * ITEMS_PER_PAGE
    page = Page(
        items=items[start : start + ITEMS_PER_PAGE],
        page=number,
        per_page=ITEMS_PER_PAGE,
        total=len(items),
        capped=False,
    )
    errors = {p.path: p.message for p in problems}
    return render_template(
        "plans/detail.html",
        plan=plan,
        page=page,
        state=state,
        first=start + 1,
        errors=errors,
    ), (422 if problems else 200)


# --- cancelling -------------------------------------------------------------------------------


def _back(plan_id: str) -> Any:
    """Back to the plan page, with the filter and page the form was posted from."""
    ignored: list[Any] = []
    state = choice_arg(request.form, "state", ITEM_STATES, ignored)
    number = int_arg(request.form, "page", 1, 1, 1_000_000, ignored)
    args: dict[str, Any] = {}
    if state:
        args["state"] = state
    if number > 1:
        args["page"] = number
    return redirect(url_for("plans.detail", plan_id=plan_id, **args))


def _items(n: int, what: str = "item") -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


@bp.post("/<plan_id>/cancel")
@requires("operator")
def cancel(plan_id: str) -> Any:
    plan = _get_plan(plan_id)
    label = plan_label(plan)
    try:
        result = ops().cancel_plan(actor(), plan["_id"])
    except NotFound:
        abort(404, description=f"no plan with id {plan_id[:100]!r}")
    except Conflict as e:
        after = _get_plan(plan["_id"])
        going = sum(n for s, n in after["counts"].items() if s in CANCELLABLE_STATES)
        flash(
            f"Plan {label} is cancelled (its waiting items were dropped and no further "
            f"attempt is queued), but {_items(going, 'running item')} could not be killed: "
            f"{e}.",
            "error",
        )
        return _back(plan["_id"])
    dropped, killing = result["dropped"], result["killing"]
    if dropped or killing:
        done = (
            f"dropped {_items(dropped, 'waiting item')}, killing {_items(killing, 'running item')}"
        )
    else:
        done = "nothing was waiting or running"
    flash(f"Plan {label} cancelled: {done}. No further attempt is queued.", "ok")
    return _back(plan["_id"])


@bp.post("/items/<item_id>/cancel")
@requires("operator")
def cancel_item(item_id: str) -> Any:
    attempts = store().item_attempts(item_id)
    if not attempts or not attempts[0].get("plan_id"):
        abort(404, description=f"no plan item with id {item_id[:100]!r}")
    plan_id = attempts[0]["plan_id"]
    latest = attempts[-1]
    label = f"{latest.get('task_name') or item_id} (#{latest.get('item_index', 0)})"
    try:
        result = ops().cancel_item(actor(), item_id)
    except NotFound:
        abort(404, description=f"no plan item with id {item_id[:100]!r}")
    except Conflict as e:
        flash(f"Item {label} not cancelled: {e}.", "error")
        return _back(plan_id)
    if result["dropped"]:
        flash(f"Item {label} cancelled: dropped 1 waiting attempt (it had not started).", "ok")
    else:
        flash(
            f"Item {label} cancelled: killing {_items(result['killing'], 'running attempt')} "
            "(its agent stops it).",
            "ok",
        )
    return _back(plan_id)
