"""The ``plan`` group: submit a plan file (JSON or XML), show a plan's state, cancel one."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ..exceptions import Problem, ValidationError
from .common import _operations, _store, cli_actor, config_option


@click.group("plan")
def plan_group() -> None:
    """Plans: sets of items, each run once by a free agent of its type."""


@plan_group.command("submit")
@config_option
@click.argument("path", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--json", "as_json", is_flag=True, help="Print the receipt as JSON.")
def plan_submit(config_path: str | None, path: str, as_json: bool) -> None:
    """Submit the plan in PATH (a .json or .xml file; - reads standard input). The whole
    plan is checked first: every problem is printed and nothing is stored."""
    raw = sys.stdin.buffer.read() if path == "-" else _read(path)
    xml = path.lower().endswith(".xml") or raw.lstrip()[:1] == b"<"
    data: Any = raw
    if not xml:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            where = f"line {e.lineno}, column {e.colno}: " if hasattr(e, "lineno") else ""
            raise ValidationError(
                [Problem(path, f"not valid JSON: {where}{getattr(e, 'msg', e)}")]
            ) from None
    with _operations(config_path, cluster="optional") as ops:
        receipt = ops.submit_plan(cli_actor(), data, xml=xml)
    if as_json:
        click.echo(json.dumps(receipt, indent=2))
        return
    click.echo(
        f"plan {receipt['plan_id']}: {receipt['accepted']} items queued"
        + (f", {receipt['existing']} submitted before" if receipt["existing"] else "")
    )
    for item in receipt["items"]:
        mark = " (submitted before)" if item["existing"] else ""
        click.echo(f"  {item['item_id']}  {item['type']:<12} {item['name']}{mark}")


@plan_group.command("status")
@config_option
@click.argument("plan_id")
@click.option("--items", "show_items", is_flag=True, help="List every item too.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_status(config_path: str | None, plan_id: str, show_items: bool, as_json: bool) -> None:
    """A plan's counts by state (and, with --items, every item). Exit code 0 when every
    item succeeded, 1 while items wait or run, 2 when an item ended otherwise."""
    with _store(config_path) as store:
        plan = store.get_plan(plan_id)
        items = store.plan_items(plan_id) if (show_items or as_json) else []
    finals = [i for i in items] if items else []
    if as_json:
        out = {k: v for k, v in plan.items() if k != "_id"} | {"plan_id": plan_id, "items": items}
        click.echo(json.dumps(out, indent=2, default=str))
    else:
        counts = ", ".join(f"{n} {state}" for state, n in plan["counts"].items())
        state = "done" if plan["done"] else "cancelled" if plan.get("cancelled_at") else "open"
        click.echo(f"plan {plan_id} {plan.get('name') or ''}".rstrip() + f": {state}")
        click.echo(f"  {plan['total']} items: {counts or 'none'}")
        for item in finals:
            agent = f" on {item['agent']}" if item.get("agent") else ""
            click.echo(
                f"  {item['item_id']}  {item['state']:<10} attempt {item['attempt']}{agent}"
                f"  {item['name']}" + (f"  ({item['error']})" if item.get("error") else "")
            )
    bad = set(plan["counts"]) - {"succeeded", "queued", "claimed", "running", "retrying"}
    if not plan["done"]:
        sys.exit(2 if bad and plan.get("cancelled_at") else 1)
    sys.exit(2 if bad else 0)


@plan_group.command("cancel")
@config_option
@click.argument("plan_id")
def plan_cancel(config_path: str | None, plan_id: str) -> None:
    """Cancel a plan: waiting items are dropped, running ones killed."""
    with _operations(config_path, cluster="required") as ops:
        result = ops.cancel_plan(cli_actor(), plan_id)
    click.echo(
        f"plan {plan_id} cancelled: {result['dropped']} waiting items dropped, "
        f"{result['killing']} running items being killed"
    )


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValidationError([Problem(path, f"cannot read the file: {e.strerror}")]) from None
