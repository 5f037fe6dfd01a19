"""The systemd units of scripts/systemd/: what each must say (a dedicated user, restart on
failure, the journal, the stop that fits the program), that their command lines name real
``cloudtask`` commands and options (asked of the CLI itself), that their environment names real
config keys, that the agent's unit keeps out the sandboxing that would confine its tasks, and,
where ``systemd-analyze`` works, that systemd itself reads them without a warning."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cloudtask.cli import cli
from cloudtask.config import AgentConfig, load_config

UNITS_DIR = Path(__file__).resolve().parent.parent / "scripts" / "systemd"
UNITS = {
    "cloudtask-agent.service": "agent",
    "cloudtask-center.service": "center",
    "cloudtask-web.service": "web",
}
CONFIG = "/etc/cloudtask/cloudtask.json"
INSTALLED_CLI = "/opt/cloudtask/venv/bin/cloudtask"

# what would confine the agent's tasks too (they run in the agent's unit): kept out of it
CONFINES_TASKS = {
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateUsers",
    "PrivateNetwork",
    "NoNewPrivileges",
    "CapabilityBoundingSet",
    "RestrictNamespaces",
    "RestrictAddressFamilies",
    "RestrictSUIDSGID",
    "MemoryDenyWriteExecute",
    "SystemCallFilter",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "DynamicUser",
    "ProtectClock",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "DevicePolicy",
    "DeviceAllow",
    "IPAddressDeny",
    "TasksMax",
    "MemoryMax",
}


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file, each a list of (key, value) in order (a key may repeat, as
    ``Environment=`` does). Raises ValueError on a line that is neither."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        if current is None or "=" not in line or raw[0].isspace() or line.endswith("\\"):
            raise ValueError(f"line {number}: not a key=value line of a section: {raw!r}")
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


def _unit(name: str) -> dict[str, list[tuple[str, str]]]:
    return parse_unit((UNITS_DIR / name).read_text(encoding="utf-8"))


def _one(section: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in section if k == key]
    assert len(values) == 1, f"{key}= given {len(values)} times"
    return values[0]


def _seconds(value: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|s|h)?", value):
        total += float(number) * {"ms": 0.001, "min": 60, "h": 3600}.get(unit, 1)
    return total


def test_parse_unit_refuses_what_is_not_a_unit():
    assert parse_unit("[A]\nx=1\nx=2\n# c\n") == {"A": [("x", "1"), ("x", "2")]}
    for bad in ("x=1\n", "[A]\nnonsense\n", "[A]\nx=1 \\\n  y\n"):
        with pytest.raises(ValueError):
            parse_unit(bad)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_every_unit_restarts_on_failure_as_a_dedicated_user_into_the_journal(name):
    unit = _unit(name)
    assert set(unit) == {"Unit", "Service", "Install"}
    assert _one(unit["Unit"], "Description").startswith("CloudTask")
    assert "network-online.target" in _one(unit["Unit"], "After")
    service = unit["Service"]
    assert _one(service, "User") == "cloudtask" and _one(service, "Group") == "cloudtask"
    assert _one(service, "Restart") == "on-failure"
    assert _seconds(_one(service, "RestartSec")) >= 1
    assert _one(service, "StandardOutput") == "journal"
    assert _one(service, "StandardError") == "journal"
    assert _one(service, "SyslogIdentifier") == name.removesuffix(".service")
    assert _one(service, "KillSignal") == "SIGTERM"
    assert _one(unit["Install"], "WantedBy") == "multi-user.target"
    # credentials come from a root-only file systemd reads, never from the unit
    env_file = _one(service, "EnvironmentFile")
    assert env_file.startswith("-/etc/cloudtask/") and env_file.endswith(".env")
    for key, value in service:
        if key == "Environment":
            assert not re.search(r"(URI|AUTH|SECRET|PASSWORD|KEYS)=", value), value


@pytest.mark.parametrize("name", sorted(UNITS))
def test_exec_start_names_real_commands_and_options(name):
    service = _unit(name)["Service"]
    argv = shlex.split(_one(service, "ExecStart"))
    assert argv[0] == INSTALLED_CLI
    command_name = UNITS[name]
    assert argv[1] == command_name
    command = cli.commands[command_name]
    options = {opt: p for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    help_text = CliRunner().invoke(cli, [command_name, "--help"])
    assert help_text.exit_code == 0, help_text.output
    words = argv[2:]
    while words:
        word = words.pop(0)
        assert word in options, f"{name}: cloudtask {command_name} has no option {word}"
        assert word in help_text.output
        if not getattr(options[word], "is_flag", False):
            value = words.pop(0)
            assert not value.startswith("-"), f"{word} takes a value"
            if word == "--config":
                assert value == CONFIG
    assert "--config" in argv
    # and the command line parses as the CLI reads it (nothing run: --help stops it)
    parsed = CliRunner().invoke(cli, [*argv[1:], "--help"])
    assert parsed.exit_code == 0, parsed.output


@pytest.mark.parametrize("name", sorted(UNITS))
def test_the_units_environment_names_real_config_keys(name):
    """``Environment=CLOUDTASK_<SECTION>_<KEY>=...`` must be a key the config reads (a typo
    would be ignored silently), and a state directory the unit asks systemd for must be where
    the program keeps its files."""
    service = _unit(name)["Service"]
    env = dict(v.split("=", 1) for k, v in service if k == "Environment")
    cfg = load_config(None, environ=env)
    for var, value in env.items():
        section, _, key = var.removeprefix("CLOUDTASK_").partition("_")
        assert getattr(getattr(cfg, section.lower()), key.lower()) == value, var
    states = [v for k, v in service if k == "StateDirectory"]
    assert states or name == "cloudtask-center.service"  # the center keeps no file
    for state in states:
        assert f"/var/lib/{state}" in env.values(), f"StateDirectory={state} is used by nothing"


def test_the_agents_stop_lets_it_end_its_runs_itself():
    service = _unit("cloudtask-agent.service")["Service"]
    # SIGTERM to the agent alone (the guard ignores it; the runs would get it all at once
    # with control-group), SIGKILL to what is left once it has exited
    assert _one(service, "KillMode") == "mixed"
    assert not [k for k, _ in service if k in ("ExecStop", "SendSIGKILL")]
    # the agent's stop: kill_grace for the runs to finish, kill_grace between SIGTERM and
    # SIGKILL, then its last writes: systemd must not cut it short
    grace = AgentConfig().kill_grace
    assert _seconds(_one(service, "TimeoutStopSec")) >= 2 * grace + 30


def test_the_agent_unit_does_not_confine_its_tasks():
    service = _unit("cloudtask-agent.service")["Service"]
    confining = sorted({k for k, _ in service} & CONFINES_TASKS)
    assert not confining, f"these would apply to every task the agent runs: {confining}"
    assert _one(service, "UMask") == "0022"  # what tasks inherit


@pytest.mark.parametrize("name", ["cloudtask-center.service", "cloudtask-web.service"])
def test_center_and_web_are_confined(name):
    service = dict(_unit(name)["Service"])
    assert service["KillMode"] == "control-group"
    assert service["ProtectSystem"] == "strict"
    for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables"):
        assert service[key] == "yes", key
    assert service["ProtectHome"] == "yes"
    assert service["CapabilityBoundingSet"] == ""
    assert service["UMask"] == "0077"


def test_systemd_reads_the_units_without_a_warning(tmp_path):
    """Only where ``systemd-analyze verify`` works on a trivial unit (it needs no running
    systemd); elsewhere this part alone is skipped."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("no systemd-analyze on this machine")
    probe = tmp_path / "probe.service"
    probe.write_text("[Service]\nExecStart=/bin/true\n")
    try:
        trial = subprocess.run(
            [tool, "verify", str(probe)], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"systemd-analyze does not run here: {e}")
    if trial.returncode != 0:
        pytest.skip(f"systemd-analyze verify does not work here: {trial.stderr.strip()}")
    # systemd checks that ExecStart is executable: the installed path becomes this venv's
    real = Path(sys.executable).parent / "cloudtask"
    assert real.is_file(), "the cloudtask script of this environment"
    copies = []
    for name in sorted(UNITS):
        copy = tmp_path / name
        copy.write_text((UNITS_DIR / name).read_text().replace(INSTALLED_CLI, str(real)))
        copies.append(str(copy))
    result = subprocess.run([tool, "verify", *copies], capture_output=True, text=True, timeout=120)
    said = [line for line in (result.stdout + result.stderr).splitlines() if "cloudtask-" in line]
    assert result.returncode == 0 and not said, result.stdout + result.stderr
    # and it would say so: a misspelt key is reported
    bad = tmp_path / "bad" / "cloudtask-agent.service"
    bad.parent.mkdir()
    bad.write_text(Path(copies[0]).read_text().replace("KillMode=", "KilMode="))
    result = subprocess.run([tool, "verify", str(bad)], capture_output=True, text=True)
    assert "KilMode" in result.stdout + result.stderr
