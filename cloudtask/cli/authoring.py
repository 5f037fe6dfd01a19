"""The commands for writing tasks: ``validate`` checks task files, ``apply`` stores them, and
``next`` prints the next fire times of a schedule."""

from __future__ import annotations

import json
from typing import Any

import click

from ..clock import utcnow
from ..exceptions import ValidationError
from ..taskfiles import read_task_files
from .common import _operations, cli_actor, config_option


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
def validate(paths: tuple[str, ...]) -> None:
    """Check task files (or folders of *.json) without storing anything."""
    tasks, errors = read_task_files(paths)
    if errors:
        raise click.ClickException("invalid task files:\n  " + "\n  ".join(errors))
    click.echo(f"{len(tasks)} task(s) valid")


@click.command()
@config_option
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
def apply(config_path: str | None, paths: tuple[str, ...]) -> None:
    """Create or update the tasks in these JSON files (all checked first; nothing stored if any is bad).

    What is stored but should not be (a header named like a credential given in clear) is
    printed to standard error as ``warning: TASK: PATH: MESSAGE``; it does not fail the apply."""
    from ..operations import task_warnings

    tasks, errors = read_task_files(paths)
    if errors:
        raise click.ClickException("nothing applied; invalid task files:\n  " + "\n  ".join(errors))
    with _operations(config_path, cluster="optional") as ops:
        results = ops.apply_tasks(cli_actor(), [(str(path), data) for path, data in tasks])
    for outcome, name in results:
        click.echo(f"{outcome:9} {name}")
    for _, data in tasks:  # every task applied (unchanged ones too: still stored in clear)
        for problem in task_warnings(data):
            click.echo(f"warning: {data['name']}: {problem}", err=True)


@click.command("next")
@click.argument("schedule")
@click.option("--timezone", "tz", default=None, help="IANA time zone for a cron expression.")
@click.option("-n", "--count", default=10, show_default=True, type=click.IntRange(1, 1000))
def next_cmd(schedule: str, tz: str | None, count: int) -> None:
    """Print the next fire times of a schedule: a cron expression or a JSON schedule object."""
    from ..jsonlimits import JSONDepthError, loads
    from ..schedules import next_fires, parse_schedule

    text = schedule.strip()
    try:
        value: Any = loads(text) if text.startswith(("{", "[")) else {"cron": text}
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON at column {e.colno}: {e.msg}") from None
    except JSONDepthError as e:
        raise click.BadParameter(f"not usable JSON: {e}") from None
    if tz and isinstance(value, dict):
        value["timezone"] = tz
    parsed, problems = parse_schedule(value)
    if problems or parsed is None:
        raise ValidationError(problems, source="the schedule")
    zone = value.get("timezone", "UTC") if isinstance(value, dict) else "UTC"
    from zoneinfo import ZoneInfo

    for t in next_fires(parsed, utcnow(), count):
        click.echo(f"{t.isoformat()}  {t.astimezone(ZoneInfo(zone)).isoformat()} {zone}")
