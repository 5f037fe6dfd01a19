"""The commands for writing tasks: ``validate`` checks task files, ``apply`` shows what it
would change and stores them, ``export`` writes stored tasks as task files, and ``next``
prints the next fire times of a schedule. The plan and the diffs are
:mod:`cloudtask.taskdiff`'s; the files ``export`` writes, :mod:`cloudtask.taskexport`'s."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import click

from ..clock import utcnow
from ..exceptions import CloudTaskError, ValidationError
from ..task import validate_task
from ..taskfiles import read_task_files
from .common import _operations, _store, cli_actor, config_option

PROGRESS_OVER = 50  # a progress bar instead of a line per task past this many changes
EXIT_PENDING = 3  # --dry-run --detailed-exitcode: the plan has changes


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
def validate(paths: tuple[str, ...]) -> None:
    """Check task files (or folders of *.json) without storing anything.

    A one-shot time that has passed is a warning, not an error: ``apply`` refuses it only in
    a new task or a changed schedule, so the file of a one-shot that ran (``export`` writes
    it) applies back unchanged."""
    tasks, errors = read_task_files(paths, past_ok=True)
    if errors:
        raise click.ClickException("invalid task files:\n  " + "\n  ".join(errors))
    now = utcnow()
    for path, data in tasks:
        # (read without the clock, so the clock's problems are all that can be found here)
        for problem in validate_task(data, now=now):
            click.echo(
                f"warning: {path}: task {data['name']!r}: {problem} (refused for a new task or "
                "a changed schedule; a stored one that is unchanged is left as it is)",
                err=True,
            )
    click.echo(f"{len(tasks)} task(s) valid")


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):  # closed or replaced
        return False


@click.command()
@config_option
@click.option("-y", "--yes", is_flag=True, help="Apply without asking.")
@click.option("--dry-run", is_flag=True, help="Print the plan only; change nothing.")
@click.option(
    "--detailed-exitcode",
    is_flag=True,
    help=f"With --dry-run: exit {EXIT_PENDING} when the plan has changes, 0 when none.",
)
@click.option(
    "--prune",
    is_flag=True,
    help="Also delete the tasks apply created or changed before that no file names any "
    "more, in the groups the files use (and --prune-group).",
)
@click.option(
    "--prune-group",
    "prune_groups",
    multiple=True,
    metavar="GROUP",
    help="A group to prune too, though no file uses it (its last file removed); implies "
    "--prune. Repeatable.",
)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
def apply(
    config_path: str | None,
    yes: bool,
    dry_run: bool,
    detailed_exitcode: bool,
    prune: bool,
    prune_groups: tuple[str, ...],
    paths: tuple[str, ...],
) -> None:
    """Make the stored tasks match these JSON files (or folders of *.json).

    Every file is checked first (nothing is stored if any is bad). Then the plan is printed:
    each task ``create``, ``change`` (with the fields that differ, ``path: old → new``) or
    ``unchanged``, and with --prune ``delete``. It is applied with --yes, or when confirmed
    at a terminal; without a terminal and without --yes nothing is applied (exit 2).
    An unchanged task is not written at all.

    --prune deletes only tasks that apply (or ``cloudtask up``) created or changed, in the
    groups the files use or --prune-group names: never a task made on the site, through the
    API or with ``cloudtask task``, never one of another group.

    What is stored but should not be (a header named like a credential given in clear) is
    printed to standard error as ``warning: TASK: PATH: MESSAGE``; it does not fail the apply."""
    from ..operations import task_warnings
    from ..taskdiff import after_parents, make_plan

    prune = prune or bool(prune_groups)
    if detailed_exitcode and not dry_run:
        raise click.UsageError("--detailed-exitcode goes with --dry-run")
    tasks, errors = read_task_files(paths, past_ok=True)
    if errors:
        raise click.ClickException("nothing applied; invalid task files:\n  " + "\n  ".join(errors))
    named = [(str(path), data) for path, data in tasks]
    with _operations(config_path, cluster="none" if dry_run else "optional") as ops:
        batch = after_parents(data for _, data in named)  # parents applied with children
        for source, data in named:  # every file checked against what is stored, first
            try:
                ops.check_apply(data, batch)
            except ValidationError as e:
                raise ValidationError(e.problems, source=source) from None
        plan = make_plan(ops.store, named, prune=prune, prune_groups=prune_groups)
        for line in plan.lines():
            click.echo(line)
        for _, data in tasks:  # every task of the files (unchanged ones are stored so too)
            for problem in task_warnings(data):
                click.echo(f"warning: {data['name']}: {problem}", err=True)
        pending = plan.pending
        if not pending:
            click.echo("No changes.")
            return
        if dry_run:
            if detailed_exitcode:
                click.get_current_context().exit(EXIT_PENDING)
            return
        if not yes:
            if not _stdin_is_tty():
                click.echo(
                    f"Error: nothing applied: {len(pending)} change(s) need a confirmation; "
                    "give --yes to apply them (or run at a terminal to be asked, or give "
                    "--dry-run to see the plan only)",
                    err=True,
                )
                click.get_current_context().exit(2)
            question = f"Apply these {len(pending)} change(s)?"  # on stderr: seen when piped
            if not click.confirm(question, default=False, err=True):
                click.echo("Nothing applied.")
                click.get_current_context().exit(1)
        _run_plan(ops, pending)


def _run_plan(ops: Any, pending: list[Any]) -> None:
    """Apply the plan's changes in order (creates and changes in the files' order, then
    deletes); a failure stops it, saying what was applied before and what was not."""
    actor = cli_actor()
    done: list[tuple[str, str]] = []
    bar = len(pending) > PROGRESS_OVER
    progress: Any = (
        click.progressbar(pending, label=f"Applying {len(pending)} changes", file=sys.stderr)
        if bar
        else nullcontext(pending)
    )
    item = None
    try:
        with progress as items:
            for item in items:
                outcome = _apply_item(ops, actor, item)
                done.append((outcome, item.name))
                if not bar:
                    click.echo(f"{outcome:9} {item.name}")
    except (CloudTaskError, KeyboardInterrupt) as e:
        assert item is not None
        applied = [name for outcome, name in done if outcome not in ("skipped", "unchanged")]
        rest = [i.name for i in pending[len(done) + 1 :]]
        where = f" ({item.source})" if item.source else ""
        if isinstance(e, KeyboardInterrupt):  # the task at work is written whole or not at all
            click.echo(
                f"\nInterrupted at {item.name}{where}: applied or not (apply --dry-run tells)",
                err=True,
            )
        else:
            click.echo(f"Error: stopped at {item.name}{where}: {e}", err=True)
            rest.insert(0, item.name)
        click.echo(f"applied before it ({len(applied)}): {', '.join(applied) or 'none'}", err=True)
        click.echo(f"not applied ({len(rest)}): {', '.join(rest) or 'none'}", err=True)
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
        click.get_current_context().exit(2 if isinstance(e, ValidationError) else code)
    counts = {k: sum(1 for o, _ in done if o == k) for k in ("created", "updated", "deleted")}
    others = len(done) - sum(counts.values())
    tail = f", {others} skipped" if others else ""
    click.echo(
        f"Applied: {counts['created']} created, {counts['updated']} changed, "
        f"{counts['deleted']} deleted{tail}."
    )


def _apply_item(ops: Any, actor: str, item: Any) -> str:
    from ..taskdiff import apply_item

    outcome, why = apply_item(ops, actor, item)
    if why:
        click.echo(f"{outcome:9} {item.name} ({why})", err=True)
    return outcome


@click.command("export")
@config_option
@click.option(
    "--group", "groups", multiple=True, metavar="GROUP", help="Only this group (repeatable)."
)
@click.option("--task", "names", multiple=True, metavar="NAME", help="Only this task (repeatable).")
@click.option(
    "--out",
    default="-",
    show_default=True,
    metavar="DIR",
    help="The folder to write one NAME.json per task into (made if missing); - writes one "
    "JSON list to standard output.",
)
def export(
    config_path: str | None, groups: tuple[str, ...], names: tuple[str, ...], out: str
) -> None:
    """Write stored tasks as task files that ``cloudtask apply`` reads back unchanged.

    Keys at their defaults are left out; secrets stay references (``{"secret": NAME}``).
    File names are the task names made safe (letters, digits, '.', '_', '-'; names that
    differ only in case get -2, -3...). Files already in the folder are replaced; others
    are left, and named on standard error (apply would read them too)."""
    from ..taskexport import dump, file_names, short_form, write_file

    with _store(config_path) as store:
        docs = store.list_tasks(groups=list(groups) or None)
    docs.sort(key=lambda d: d["name"])
    if names:
        found = {d["name"] for d in docs}
        missing = [n for n in names if n not in found]
        if missing:
            where = f" in group {', '.join(groups)}" if groups else ""
            raise click.BadParameter(
                f"no task named {', '.join(map(repr, missing))}{where}; nothing written",
                param_hint="--task",
            )
        docs = [d for d in docs if d["name"] in set(names)]
    specs: list[tuple[str, dict[str, Any]]] = []
    failed = 0
    from ..operations import task_warnings

    for doc in docs:
        try:
            specs.append((doc["name"], short_form(doc["spec"])))
            for problem in task_warnings(doc["spec"]):  # written so, as it is stored
                click.echo(f"warning: {doc['name']}: {problem}", err=True)
        except ValidationError as e:
            failed += 1
            click.echo(
                f"warning: {doc['name']!r} not exported: its stored spec is invalid: "
                f"{'; '.join(map(str, e.problems))}",
                err=True,
            )
    if out == "-":
        click.echo(json.dumps([spec for _, spec in specs], indent=2, ensure_ascii=False))
    else:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise click.BadParameter(f"{out} is not a folder", param_hint="--out")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            chosen = file_names(name for name, _ in specs)
            written = set()
            for name, spec in specs:
                path = write_file(folder, chosen[name], dump(spec))
                written.add(path.name)
                click.echo(str(path))
        except OSError as e:
            raise click.ClickException(f"cannot write into {out}: {e.strerror or e}") from None
        others = sorted(p.name for p in folder.glob("*.json") if p.name not in written)
        if others:
            click.echo(
                f"note: {len(others)} other file(s) in {out} were not written by this export "
                f"(apply reads them too): {', '.join(others)}",
                err=True,
            )
        click.echo(f"{len(specs)} task(s) exported to {out}", err=True)
    if failed:
        click.get_current_context().exit(1)


@click.command("next")
@click.argument("schedule")
@click.option("--timezone", "tz", default=None, help="IANA time zone for a cron expression.")
@click.option("-n", "--count", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--group", default=None, help="Mark the fires a blackout of this group skips.")
def next_cmd(schedule: str, tz: str | None, count: int, group: str | None) -> None:
    """Print the next fire times of a schedule: a cron expression or a JSON schedule object.
    The calendars it names and the blackouts (of --group, and of every group) are read from
    the configured MongoDB when it names a calendar or --group is given."""
    from ..calendars import preview, rule_names
    from ..jsonlimits import JSONDepthError, loads
    from ..schedules import parse_schedule

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

    book = None
    if rule_names(parsed) or group:
        with _store(None) as store:
            book = store.calendar_book(rule_names(parsed), group)
    for t, blackout in preview(parsed, group or "", utcnow(), count, book):
        skipped = f"  skipped: blackout {blackout}" if blackout else ""
        click.echo(f"{t.isoformat()}  {t.astimezone(ZoneInfo(zone)).isoformat()} {zone}{skipped}")
