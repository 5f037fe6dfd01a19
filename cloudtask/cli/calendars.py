"""The ``calendar`` and ``blackout`` groups: named calendars that schedules include or
exclude (``"calendar": {"only": "workdays", "skip": "de-holidays"}``), and maintenance
windows of agent groups in which nothing starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..calendars import MAX_ICS_BYTES, describe_blackout
from ..exceptions import Problem, ValidationError
from .common import _operations, _store, cli_actor, config_option


def _listed(values: tuple[str, ...]) -> list[str]:
    """Values given as repeated options and/or comma-separated."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _show_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str, sort_keys=True))


@click.group("calendar")
def calendar_group() -> None:
    """Calendars (holiday dates, weekdays) that schedules include or exclude."""


@calendar_group.command("set")
@config_option
@click.argument("name")
@click.option(
    "--dates",
    multiple=True,
    help="Dates YYYY-MM-DD or ranges YYYY-MM-DD..YYYY-MM-DD, comma-separated or repeated.",
)
@click.option("--weekdays", multiple=True, help="Weekdays such as mon,tue,wed,thu,fri.")
@click.option("--description", default=None, help="What the calendar is.")
def calendar_set(
    config_path: str | None,
    name: str,
    dates: tuple[str, ...],
    weekdays: tuple[str, ...],
    description: str | None,
) -> None:
    """Create calendar NAME, or replace its dates and weekdays."""
    body: dict[str, Any] = {"dates": _listed(dates), "weekdays": _listed(weekdays)}
    if description is not None:
        body["description"] = description
    with _operations(config_path, cluster="none") as ops:
        calendar, created = ops.set_calendar(cli_actor(), name, body)
    _echo_calendar(calendar, "created" if created else "replaced")


def _echo_calendar(calendar: dict[str, Any], what: str) -> None:
    dates = calendar.get("dates") or []
    weekdays = ",".join(calendar.get("weekdays") or []) or "no weekdays"
    span = f" ({dates[0]} to {dates[-1]})" if dates else ""
    click.echo(f"calendar {calendar['name']} {what}: {weekdays}, {len(dates)} dates{span}")


@calendar_group.command("import")
@config_option
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--timezone", "tz", default="UTC", show_default=True, help="Where a timed event's date is read."
)
@click.option("--weekdays", multiple=True, help="Weekdays to add, such as sat,sun.")
@click.option("--description", default=None, help="What the calendar is.")
def calendar_import(
    config_path: str | None,
    name: str,
    file: Path,
    tz: str,
    weekdays: tuple[str, ...],
    description: str | None,
) -> None:
    """Create or replace calendar NAME with the dates of the events of FILE, an iCalendar
    (.ics) file: from a year ago to three years ahead, recurrences expanded. A file that
    cannot be read is refused with the line and what is wrong (the calendar is unchanged)."""
    try:
        with file.open("rb") as handle:
            data = handle.read(MAX_ICS_BYTES + 1)
    except OSError as e:
        raise click.BadParameter(f"cannot read {file}: {e.strerror}", param_hint="FILE") from None
    if len(data) > MAX_ICS_BYTES:
        raise ValidationError(
            [Problem("file", f"larger than {MAX_ICS_BYTES // 1024} KiB")], source=str(file)
        )
    with _operations(config_path, cluster="none") as ops:
        calendar, created = ops.import_calendar(
            cli_actor(),
            name,
            data,
            filename=file.name,
            timezone=tz,
            weekdays=_listed(weekdays),
            description=description,
        )
    _echo_calendar(calendar, "imported" if created else "replaced")


@calendar_group.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
def calendar_list(config_path: str | None, as_json: bool) -> None:
    """Every calendar: its weekdays and how many dates."""
    with _store(config_path) as store:
        calendars = store.list_calendars()
    if as_json:
        return _show_json(calendars)
    if not calendars:
        click.echo("no calendars")
    for c in calendars:
        weekdays = ",".join(c["weekdays"]) or "-"
        click.echo(
            f"{c['name']}\t{weekdays}\t{c['date_count']} dates\t{c.get('description') or ''}"
        )
    return None


@calendar_group.command("show")
@config_option
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
def calendar_show(config_path: str | None, name: str, as_json: bool) -> None:
    """A calendar's dates and weekdays, and the tasks naming it."""
    with _store(config_path) as store:
        calendar = store.get_calendar(name)
        calendar["tasks"] = [t["name"] for t in store.tasks_using_calendar(name)]
    if as_json:
        return _show_json(calendar)
    click.echo(f"calendar {calendar['name']}")
    for key in ("description", "source", "updated_by", "updated_at"):
        if calendar.get(key):
            click.echo(f"{key}: {calendar[key]}")
    click.echo(f"weekdays: {','.join(calendar.get('weekdays') or []) or '-'}")
    click.echo(f"dates ({len(calendar.get('dates') or [])}):")
    for day in calendar.get("dates") or []:
        click.echo(f"  {day}")
    click.echo(f"tasks: {', '.join(calendar['tasks']) or '-'}")
    return None


@calendar_group.command("delete")
@config_option
@click.argument("name")
def calendar_delete(config_path: str | None, name: str) -> None:
    """Delete calendar NAME (refused while a task names it)."""
    with _operations(config_path, cluster="none") as ops:
        ops.delete_calendar(cli_actor(), name)
    click.echo(f"deleted calendar {name}")


@click.group("blackout")
def blackout_group() -> None:
    """Blackout windows: nothing of an agent group starts in them (fires recorded skipped)."""


@blackout_group.command("set")
@config_option
@click.argument("name")
@click.option("--group", required=True, help="The agent group, or '*' for every group.")
@click.option(
    "--timezone", "tz", default="UTC", show_default=True, help="IANA time zone of the times."
)
@click.option("--days", multiple=True, help="Weekly on these days, such as sun or sat,sun.")
@click.option("--dates", multiple=True, help="On these dates (YYYY-MM-DD, ranges A..B).")
@click.option("--from", "opens", default=None, help="Local time the window opens (00:00).")
@click.option(
    "--to",
    "closes",
    default=None,
    help="Local time it closes (24:00; at or before --from: the next day).",
)
@click.option("--start", default=None, help="Once: local time YYYY-MM-DDTHH:MM it opens.")
@click.option("--end", default=None, help="Once: local time it closes.")
@click.option("--description", default=None, help="What the window is for.")
def blackout_set(
    config_path: str | None,
    name: str,
    group: str,
    tz: str,
    days: tuple[str, ...],
    dates: tuple[str, ...],
    opens: str | None,
    closes: str | None,
    start: str | None,
    end: str | None,
    description: str | None,
) -> None:
    """Create or replace blackout NAME: weekly (--days, --from, --to), on dates (--dates),
    or once (--start, --end)."""
    body: dict[str, Any] = {"group": group, "timezone": tz}
    for key, value in (("days", _listed(days)), ("dates", _listed(dates))):
        if value:
            body[key] = value
    for key, text in (("from", opens), ("to", closes), ("start", start), ("end", end)):
        if text is not None:
            body[key] = text
    if description is not None:
        body["description"] = description
    with _operations(config_path, cluster="none") as ops:
        blackout, created = ops.set_blackout(cli_actor(), name, body)
    what = "created" if created else "replaced"
    click.echo(f"blackout {name} {what}: group {blackout['group']}, {describe_blackout(blackout)}")


@blackout_group.command("list")
@config_option
@click.option("--group", default=None, help="Only this group's (and every group's).")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")
def blackout_list(config_path: str | None, group: str | None, as_json: bool) -> None:
    """Every blackout window."""
    with _store(config_path) as store:
        blackouts = store.list_blackouts(group)
    if as_json:
        return _show_json(blackouts)
    if not blackouts:
        click.echo("no blackouts")
    for b in blackouts:
        click.echo(
            f"{b['name']}\t{b['group']}\t{describe_blackout(b)}\t{b.get('description') or ''}"
        )
    return None


@blackout_group.command("delete")
@config_option
@click.argument("name")
def blackout_delete(config_path: str | None, name: str) -> None:
    """Delete blackout NAME."""
    with _operations(config_path, cluster="none") as ops:
        ops.delete_blackout(cli_actor(), name)
    click.echo(f"deleted blackout {name}")
