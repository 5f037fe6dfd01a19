"""``cloudtask crontab``: crontab lines become task files ``apply`` reads, meaning what cron
meant (fields, macros, time zone, shell, PATH, HOME, MAILTO, a system crontab's user), and a
line that cannot be a task is reported with its reason instead of guessed at."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from click.testing import CliRunner

from cloudtask.cli import cli
from cloudtask.crontab import convert_crontab
from cloudtask.schedules import next_fires
from cloudtask.task import parse_task

CRONTAB = r"""
SHELL=/bin/bash
PATH=/usr/local/bin:/usr/bin:/bin
MAILTO="ops@example.com, dba@example.com"
HOME=/srv/app
# nightly database backup
# (full, with the logs)
30 2 * * * /opt/backup/run-backup.sh --full >> /var/log/backup.log 2>&1

*/5 * * * * cd /srv/app && ./sync.py
@daily find /tmp -mtime +7 -delete
@reboot /opt/start.sh
0 1 * * * date +%Y-%m-%d > /tmp/d
0 1 * * * date +\%Y > /tmp/d
0 9 13 * fri /opt/backup/run-backup.sh
61 * * * * bad
"""


def convert(text: str = CRONTAB, **options):
    return convert_crontab(text, source="crontab", timezone="Europe/Berlin", **options)


def test_entries_become_tasks_that_mean_what_cron_meant():
    out = convert(prefix="db1")
    by_line = {e.line: e for e in out.entries}
    backup = by_line[8].task
    assert backup == {
        "name": "db1-run-backup",
        "description": "nightly database backup (full, with the logs)",
        "schedule": {"cron": "30 2 * * *", "timezone": "Europe/Berlin"},
        "command": [
            "/bin/bash",
            "-c",
            "/opt/backup/run-backup.sh --full >> /var/log/backup.log 2>&1",
        ],
        "env": {"PATH": "/usr/local/bin:/usr/bin:/bin"},
        "cwd": "/srv/app",
        "notify": {"emails": ["ops@example.com", "dba@example.com"]},
    }
    assert by_line[10].task["name"] == "db1-sync"  # past "cd DIR &&"
    assert by_line[11].task["schedule"]["cron"] == "0 0 * * *"  # @daily
    assert by_line[14].task["command"][2] == "date +%Y > /tmp/d"  # \% is %
    assert by_line[15].task["name"] == "db1-run-backup-2"  # names stay unique
    for task in out.tasks:
        parse_task(task)  # every one is a valid task


def test_lines_that_cannot_be_tasks_say_why():
    refused = {e.line: e.problem for e in convert().refused}
    assert set(refused) == {12, 13, 16}
    assert "@reboot has no fire time" in refused[12]
    assert "unescaped %" in refused[13] and "standard input" in refused[13]
    assert refused[16].startswith("schedule.cron:") and "61 * * * *" in refused[16]


def test_day_of_month_or_day_of_week_as_vixie_cron():
    """``0 9 13 * fri``: the 13th of every month *and* every Friday, not Friday the 13th."""
    task = convert().entries[-2].task
    spec = parse_task(task)
    fires = next_fires(spec.schedule, datetime(2026, 11, 1, tzinfo=timezone.utc), 8)
    local = [f.astimezone(ZoneInfo("Europe/Berlin")).date() for f in fires]
    assert any(d.day == 13 and d.weekday() != 4 for d in local)  # a 13th that is no Friday
    assert any(d.weekday() == 4 and d.day != 13 for d in local)  # a Friday that is no 13th


def test_a_system_crontab_names_the_user_and_cron_tz_changes_the_zone():
    text = "CRON_TZ=America/New_York\n17 * * * * backup /usr/local/bin/pg-dump-all\n"
    [task] = convert(text, system=True, group="db", requires={"host": "db-1"}).tasks
    assert task["run_as"] == "backup" and task["group"] == "db"
    assert task["requires"] == {"host": "db-1"}
    assert task["schedule"] == {"cron": "17 * * * *", "timezone": "America/New_York"}
    assert task["command"] == "/usr/local/bin/pg-dump-all" and task["shell"] is True
    [entry] = convert("17 * * * * /bin/true\n", system=True).entries
    assert entry.problem == "expected five time fields, a user and a command"


def test_the_command_writes_a_file_validate_accepts_and_exits_1_for_refused_lines(tmp_path):
    crontab = tmp_path / "crontab"
    crontab.write_text(CRONTAB)
    out = tmp_path / "tasks.json"
    runner = CliRunner()
    result = runner.invoke(cli, ["crontab", str(crontab), "-o", str(out), "--timezone", "UTC"])
    assert result.exit_code == 1, result.output
    assert "not converted: " + f"{crontab}:12: @reboot" in result.stderr
    assert "5 tasks converted, 3 line(s) not" in result.stderr
    tasks = json.loads(out.read_text())
    assert len(tasks) == 5 and {t["schedule"]["timezone"] for t in tasks} == {"UTC"}
    checked = runner.invoke(cli, ["validate", str(out)])
    assert checked.exit_code == 0, checked.output
    clean = runner.invoke(cli, ["crontab", "-", "--timezone", "UTC"], input="@hourly /bin/true\n")
    assert clean.exit_code == 0 and json.loads(clean.stdout)[0]["name"] == "true"
    bad = runner.invoke(cli, ["crontab", "-", "--timezone", "Mars/Olympus"], input="")
    assert bad.exit_code == 2 and "unknown time zone 'Mars/Olympus'" in bad.output
    missing = runner.invoke(cli, ["crontab", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "cannot read" in missing.output
