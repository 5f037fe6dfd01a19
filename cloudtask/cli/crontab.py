"""``cloudtask crontab``: crontab files converted into a task file ``cloudtask apply`` reads
(:mod:`cloudtask.crontab` says how each line is read)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import click

from ..crontab import convert_crontab
from ..exceptions import Problem, ValidationError


def _local_zone() -> str:
    """This machine's time zone name (cron runs in it), or UTC when it has none."""
    try:
        from tzlocal import get_localzone_name

        return get_localzone_name() or "UTC"
    except Exception:  # no zone configured on the machine
        return "UTC"


def _requirements(pairs: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    problems = []
    for n, pair in enumerate(pairs):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            problems.append(Problem(f"--requires[{n}]", f"expected LABEL=VALUE, got {pair!r}"))
        out[key] = value
    if problems:
        raise ValidationError(problems)
    return out


@click.command("crontab")
@click.argument("files", nargs=-1, required=True, type=click.Path(allow_dash=True))
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    show_default=True,
    help="The task file to write (a JSON list); - for standard output.",
)
@click.option(
    "--timezone",
    help="The crontabs' time zone (default: this machine's, as cron uses; CRON_TZ in a file wins).",
)
@click.option("--group", help="The agent group the tasks run in (default: default).")
@click.option("--prefix", default="", help="Put before every task name, e.g. the host's name.")
@click.option(
    "--system",
    is_flag=True,
    help="System crontab format (/etc/crontab, /etc/cron.d): a user field before the command.",
)
@click.option(
    "--requires",
    multiple=True,
    metavar="LABEL=VALUE",
    help="Agent labels the tasks need (e.g. host=db-1 for jobs that use that machine's files).",
)
def crontab_cmd(
    files: tuple[str, ...],
    out: str,
    timezone: str | None,
    group: str | None,
    prefix: str,
    system: bool,
    requires: tuple[str, ...],
) -> None:
    """Convert crontab files (- for standard input, e.g. `crontab -l | cloudtask crontab -`)
    into one task file for `cloudtask apply`. Each line that cannot be a task is reported with
    the reason. Exit 0 when every entry was converted, 1 when some were not (the file holds
    the rest), 2 for bad input."""
    zone = timezone or _local_zone()
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError([Problem("--timezone", f"unknown time zone {zone!r}")]) from None
    needs = _requirements(requires)
    taken: set[str] = set()
    tasks: list[dict] = []
    refused = 0
    for name in files:
        source = "standard input" if name == "-" else name
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise ValidationError([Problem(source, f"cannot read: {reason}")]) from None
        conversion = convert_crontab(
            text,
            source=source,
            timezone=zone,
            system=system,
            group=group,
            prefix=prefix,
            requires=needs,
            taken=taken,
        )
        tasks += conversion.tasks
        for entry in conversion.refused:
            refused += 1
            click.echo(f"not converted: {source}:{entry.line}: {entry.problem}", err=True)
            click.echo(f"  {entry.text.strip()}", err=True)
    text = json.dumps(tasks, indent=2, ensure_ascii=False) + "\n"
    if out == "-":
        click.echo(text, nl=False)
    else:
        Path(out).write_text(text, encoding="utf-8")
    click.echo(
        f"{len(tasks)} task{'s' if len(tasks) != 1 else ''} converted"
        f"{f', {refused} line(s) not' if refused else ''}"
        f"{f' into {out}' if out != '-' else ''}; times in {zone} unless CRON_TZ said otherwise. "
        "Unlike cron, a fire while the previous run still runs is skipped (concurrency: forbid) "
        "and a fire missed while no agent ran is caught up within misfire_grace (1h): set them "
        "per task if cron's way is wanted. Next: cloudtask apply FILE",
        err=True,
    )
    if refused:
        sys.exit(1)
