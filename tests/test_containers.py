"""Container tasks: the spec's validation, the engine request built from it, the child program
and the executor's plumbing, and (where a Docker engine answers) real containers: output,
exit codes, timeouts that stop the container, and removal afterwards.

The tests marked ``docker_engine`` need a reachable engine (``docker.from_env().ping()``:
``DOCKER_HOST`` or the default socket) and are skipped, saying so, where there is none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from helpers import finished, make_task, start, wait_for

from cloudtask.agent.container import (
    LABEL_AGENT,
    LABEL_RUN,
    LABEL_TASK,
    container_argv,
    container_name,
    create_kwargs,
    remove_agent_containers,
    remove_run_containers,
    stop_timeout,
)
from cloudtask.agent.executor import Executor
from cloudtask.agent.guard import GuardClient
from cloudtask.config import ConfigError, load_config
from cloudtask.containerspec import ContainerSpec, format_memory, parse_memory, read_container
from cloudtask.task import parse_task, validate_task

BASE = {"name": "c", "schedule": {"every": "1h"}}
NOWHERE = "unix:///nonexistent/cloudtask-test/docker.sock"  # no engine answers there


def problems(container: object, **more: object) -> list[tuple[str, str]]:
    return [(p.path, p.message) for p in validate_task({**BASE, "container": container, **more})]


def paths(container: object, **more: object) -> list[str]:
    return [path for path, _ in problems(container, **more)]


# --- the spec --------------------------------------------------------------------------------


def test_a_full_container_spec_parses_to_its_canonical_form():
    spec = parse_task(
        {
            **BASE,
            "container": {
                "image": "registry.example.com:5000/team/builder:2.4",
                "args": ["--day", "yesterday"],
                "env": {"REPORT_LANG": "de"},
                "volumes": ["/srv/reports:/out", "/etc/reports:/config:ro"],
                "cpus": 1.5,
                "memory": "512m",
            },
            "env": {"LEVEL": "info"},
            "timeout": "10m",
        }
    )
    assert spec.command is None and spec.http is None
    assert spec.container == ContainerSpec(
        image="registry.example.com:5000/team/builder:2.4",
        args=("--day", "yesterday"),
        env={"REPORT_LANG": "de"},
        volumes=("/srv/reports:/out", "/etc/reports:/config:ro"),
        cpus=1.5,
        memory=512 * 1024**2,
    )
    canonical = spec.to_dict()
    assert canonical["container"]["memory"] == "512m"
    assert parse_task(canonical) == spec  # the canonical form reads back the same
    minimal = parse_task({**BASE, "container": {"image": "alpine"}}).container
    assert minimal == ContainerSpec(image="alpine")


@pytest.mark.parametrize(
    "image",
    [
        "alpine",
        "alpine:3.20",
        "library/alpine:latest",
        "ghcr.io/org/app:v1.2.3",
        "localhost:5000/a/b-c__d.e",
        "alpine@sha256:" + "a" * 64,
        "registry.example.com/app:1.0@sha256:" + "0f" * 32,
    ],
)
def test_image_references_taken(image):
    assert problems({"image": image}) == []


@pytest.mark.parametrize(
    "image, says",
    [
        ("", "must not be empty"),
        ("Alpine", "lower case"),
        ("alpine:", "not an image reference"),
        ("alp ine", "not an image reference"),
        ("alpine::3", "not an image reference"),
        ("-alpine", "not an image reference"),
        ("alpine@sha256:abc", "not an image reference"),
        ("a" * 256, "at most 255"),
    ],
)
def test_image_references_refused(image, says):
    ((path, message),) = problems({"image": image})
    assert path == "container.image" and says in message


@pytest.mark.parametrize(
    "volume, says",
    [
        ("data:/data", "absolute"),
        ("/data:data", "absolute"),
        ("/data", "host:container"),
        ("/a:/b:/c:ro", "host:container"),
        ("/data:/data:rx", "ro or rw"),
        ("/srv/../etc:/etc2", "'..'"),
        ("/srv:/", "must not be '/'"),
    ],
)
def test_volumes_refused(volume, says):
    ((path, message),) = problems({"image": "alpine", "volumes": ["/ok:/ok", volume]})
    assert path == "container.volumes[1]" and says in message


def test_other_container_problems_each_at_its_path():
    found = problems(
        {
            "image": 3,
            "args": "echo hi",
            "env": {"OK": "1", "1X": "a", "CLOUDTASK_RUN_ID": "x", "N": 5},
            "volumes": ["/a:/same", "/b:/same/"],
            "cpus": 0,
            "memory": "512",
            "entrypoint": "sh",
        }
    )
    by_path = dict(found)
    assert set(by_path) == {
        "container.entrypoint",
        "container.image",
        "container.args",
        "container.env.1X",
        "container.env.CLOUDTASK_RUN_ID",
        "container.env.N",
        "container.volumes[1]",
        "container.cpus",
        "container.memory",
    }
    assert "mounted twice" in by_path["container.volumes[1]"]
    assert "at least 6m" in by_path["container.memory"]
    for cpus in (-1, "2", True, 2000, float("nan")):
        assert paths({"image": "alpine", "cpus": cpus}) == ["container.cpus"], cpus
    assert paths("alpine") == ["container"]
    assert paths({}) == ["container.image"]


def test_a_container_is_instead_of_a_command():
    assert "not both" in dict(problems({"image": "alpine"}, command="true"))["container"]
    assert (
        "not both"
        in dict(problems({"image": "alpine"}, http={"url": "https://x.example"}))["container"]
    )
    for key, value in (("shell", True), ("file", "a.sh"), ("cwd", "/tmp"), ("run_as", "nobody")):
        found = dict(problems({"image": "alpine"}, **{key: value}))
        assert "not to a container" in found[key], key


def test_memory_sizes():
    assert parse_memory("512m") == 512 * 2**20
    assert parse_memory("2g") == 2 * 2**30
    assert parse_memory("1.5G") == 3 * 2**29
    assert parse_memory("65536k") == 64 * 2**20
    assert parse_memory(7 * 2**20) == 7 * 2**20
    assert parse_memory("8MB") == 8 * 2**20
    for bad in ("lots", "5m", "-1g", True, 1.5, "9" * 30):
        with pytest.raises(ValueError):
            parse_memory(bad)
    assert [format_memory(n) for n in (2**30, 3 * 2**29, 7 * 2**20 + 1)] == [
        "1g",
        "1536m",
        f"{7 * 2**20 + 1}b",
    ]


def test_docker_host_setting():
    env = {"CLOUDTASK_AGENT_DOCKER_HOST": "tcp://build-host:2376"}
    assert load_config(environ=env).agent.docker_host == "tcp://build-host:2376"
    assert load_config(environ={}).agent.docker_host == ""
    with pytest.raises(ConfigError, match="engine address"):
        load_config(environ={"CLOUDTASK_AGENT_DOCKER_HOST": "build-host:2376"})


# --- the request and the child's command line --------------------------------------------------


def test_the_engine_request_built_from_a_spec():
    spec = parse_task(
        {
            **BASE,
            "container": {
                "image": "alpine:3.20",
                "args": ["sh", "-c", "echo hi"],
                "env": {"A": "from-container", "B": "b"},
                "volumes": ["/srv/in:/in:ro", "/srv/out:/out"],
                "cpus": 0.5,
                "memory": "64m",
            },
        }
    ).container
    assert spec is not None
    kwargs = create_kwargs(
        spec, run_id="r1", agent_id="a1", task_name="c", env={"A": "from-task", "T": "t"}
    )
    assert kwargs["image"] == "alpine:3.20" and kwargs["command"] == ["sh", "-c", "echo hi"]
    assert kwargs["environment"] == {"A": "from-container", "B": "b", "T": "t"}
    assert kwargs["labels"] == {LABEL_RUN: "r1", LABEL_AGENT: "a1", LABEL_TASK: "c"}
    assert kwargs["name"] == container_name("r1") == "cloudtask-r1"
    assert kwargs["auto_remove"] is False and kwargs["tty"] is False
    # what docker-py makes of it: the engine's create request
    from docker.models.containers import _create_container_args

    request = _create_container_args({**kwargs, "version": "1.44"})
    host = request["host_config"]
    assert host["NanoCpus"] == 500_000_000 and host["Memory"] == 64 * 2**20
    assert host["Binds"] == ["/srv/in:/in:ro", "/srv/out:/out"]
    assert request["volumes"] == ["/in", "/out"]
    assert request["labels"] == kwargs["labels"] and request["environment"] == kwargs["environment"]
    bare = create_kwargs(
        ContainerSpec(image="alpine"), run_id="r2", agent_id="a", task_name="t", env={}
    )
    assert bare["command"] is None and "volumes" not in bare and "nano_cpus" not in bare
    assert "mem_limit" not in bare


def test_the_child_command_line():
    spec = ContainerSpec(image="alpine", args=("true",), env={"X": "1"})
    argv = container_argv(
        spec,
        run_id="r1",
        agent_id="a1",
        task_name="t",
        pass_env=["B", "A", "B"],
        docker_host="tcp://h:2376",
        kill_grace=5.0,
    )
    assert argv[:3] == [sys.executable, "-m", "cloudtask.agent.containerrun"]
    options = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert options["--run-id"] == "r1" and options["--agent"] == "a1" and options["--task"] == "t"
    assert options["--pass-env"] == "A,B" and options["--docker-host"] == "tcp://h:2376"
    assert options["--stop-timeout"] == "4"
    assert read_container(json.loads(options["--spec"]), []) == spec  # what the child reads
    assert [stop_timeout(g) for g in (0, 1, 1.5, 5, 30)] == [0, 0, 0, 4, 29]
    no_host = container_argv(
        spec, run_id="r", agent_id="a", task_name="t", pass_env=[], docker_host="", kill_grace=1
    )
    assert "--docker-host" not in no_host


def test_the_child_says_when_no_engine_answers():
    spec = json.dumps({"image": "alpine:3.20"})
    out = subprocess.run(
        [sys.executable, "-m", "cloudtask.agent.containerrun", "--spec", spec]
        + ["--run-id", "r1", "--agent", "a1", "--task", "t", "--docker-host", NOWHERE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 125
    assert "cannot reach the Docker engine at unix:///nonexistent" in out.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "cloudtask.agent.containerrun", "--spec", '{"image": "Bad"}']
        + ["--run-id", "r1", "--agent", "a1", "--task", "t"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "container.image" in bad.stderr


def test_cleanup_without_an_engine_is_quiet_and_harmless(caplog):
    assert remove_run_containers("r1", NOWHERE) == 0
    assert "cannot look for containers left by run r1" in caplog.text
    # an agent that never had an engine does not look at all at its start
    saved = os.environ.pop("DOCKER_HOST", None)
    try:
        if not os.path.exists("/var/run/docker.sock"):
            caplog.clear()
            assert remove_agent_containers("a1", "") == 0
            assert caplog.text == ""
    finally:
        if saved is not None:
            os.environ["DOCKER_HOST"] = saved


# --- the executor's plumbing (no engine needed) ------------------------------------------------


@pytest.fixture(params=["here", "guard"])
def executor(request, writer, tmp_path):
    """Executors as in test_executor.py (their container tasks sent to an address where no
    engine answers; the tests of a real engine set ``docker_host``)."""
    guard = None
    if request.param == "guard":
        guard = GuardClient(fence=lambda: (None, 0.0), silent_after=60.0, kill_grace=1.0)
        guard.start()
    ex = Executor(
        agent_id="a-containers",  # (no other test's agent takes its runs for orphans)
        log_dir=tmp_path / "logs",
        writer=writer,
        max_parallel=4,
        kill_grace=2.0,
        guard=guard,
        docker_host=NOWHERE,
    )
    yield ex
    ex.shutdown()
    if guard is not None:
        guard.stop()


def test_a_container_run_without_an_engine_fails_saying_why(store, executor):
    ctx = start(store, executor, {"container": {"image": "alpine:3.20"}})
    run = finished(store, ctx.run_id, timeout=60)
    assert run["status"] == "failed" and run["exit_code"] == 125
    assert "cannot reach the Docker engine" in run["output_tail"]


# --- a real engine -----------------------------------------------------------------------------


def _engine_problem() -> str | None:
    try:
        import docker

        client = docker.from_env(timeout=5)
        client.ping()
        client.close()
        return None
    except Exception as e:
        return f"no Docker engine answers here (docker.from_env().ping(): {type(e).__name__}: {e})"


ENGINE_PROBLEM = _engine_problem()
docker_engine = pytest.mark.skipif(ENGINE_PROBLEM is not None, reason=ENGINE_PROBLEM or "")
IMAGE = os.environ.get("CLOUDTASK_TEST_IMAGE", "alpine:3.20")


@pytest.fixture
def engine_client():
    import docker

    client = docker.from_env(timeout=120)
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(IMAGE)
        except docker.errors.DockerException as e:
            pytest.skip(f"the engine cannot pull {IMAGE}: {e}")
    yield client
    client.close()


def _left(client, run_id: str) -> list:
    return client.containers.list(all=True, filters={"label": f"{LABEL_RUN}={run_id}"})


@docker_engine
def test_real_container_output_exit_code_env_and_removal(store, executor, engine_client):
    executor.docker_host = ""  # the agent's DOCKER_HOST, else the default socket
    script = 'echo "out $CLOUDTASK_RUN_ID $LEVEL $ONLY_HERE ${CLOUDTASK_AGENT_PROCESS:+tagged}"; echo err >&2; exit 3'
    ctx = start(
        store,
        executor,
        {
            "container": {"image": IMAGE, "args": ["sh", "-c", script], "env": {"ONLY_HERE": "x"}},
            "env": {"LEVEL": "info"},
        },
    )
    run = finished(store, ctx.run_id, timeout=120)
    assert run["status"] == "failed" and run["exit_code"] == 3
    lines = run["output_tail"].splitlines()
    assert f"out {ctx.run_id} info x tagged" in lines and "err" in lines
    assert _left(engine_client, ctx.run_id) == []  # removed
    ok = start(store, executor, {"container": {"image": IMAGE, "args": ["true"]}})
    assert finished(store, ok.run_id, timeout=120)["status"] == "succeeded"


@docker_engine
def test_real_container_timeout_stops_and_removes_it(store, executor, engine_client):
    executor.docker_host = ""
    started = time.monotonic()
    ctx = start(
        store,
        executor,
        {
            "container": {"image": IMAGE, "args": ["sh", "-c", "echo started; sleep 300"]},
            "timeout": "3s",
        },
    )
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not seen:  # it runs as a container meanwhile
        seen = _left(engine_client, ctx.run_id)
        time.sleep(0.2)
    assert seen and seen[0].labels[LABEL_AGENT] == "a-containers"
    run = finished(store, ctx.run_id, timeout=120)
    assert run["status"] == "timed_out" and "started" in run["output_tail"], repr(
        {k: run.get(k) for k in ("status", "error", "exit_code", "output_tail")}
    )
    assert time.monotonic() - started < 60
    time.sleep(1.0)
    assert _left(engine_client, ctx.run_id) == []  # stopped and removed


@docker_engine
def test_real_container_left_by_a_killed_child_is_removed(engine_client):
    # the child SIGKILLed (no stop, no removal): the agent's cleanup kills and removes it
    container = engine_client.containers.run(
        IMAGE, ["sleep", "300"], detach=True, labels={LABEL_RUN: "left-1", LABEL_AGENT: "a-left"}
    )
    try:
        assert remove_run_containers("left-1", "") == 1
        assert _left(engine_client, "left-1") == []
        engine_client.containers.run(
            IMAGE,
            ["sleep", "300"],
            detach=True,
            labels={LABEL_RUN: "left-2", LABEL_AGENT: "a-left"},
        )
        assert remove_agent_containers("a-left", "") == 1
        assert _left(engine_client, "left-2") == []
    finally:
        for c in engine_client.containers.list(
            all=True, filters={"label": f"{LABEL_AGENT}=a-left"}
        ):
            c.remove(force=True)
        del container


@docker_engine
def test_real_container_killed_by_request_is_stopped_and_removed(store, executor, engine_client):
    executor.docker_host = ""
    ctx = start(
        store,
        executor,
        {"container": {"image": IMAGE, "args": ["sh", "-c", "echo up; sleep 300"]}},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "up" not in ctx.tail.decode(errors="replace"):
        time.sleep(0.1)  # its output arrives while it runs
    assert "up" in ctx.tail.decode(errors="replace")
    assert executor.kill(ctx.run_id, "killed by an operator")
    run = finished(store, ctx.run_id, timeout=60)
    assert run["status"] == "killed" and run["error"] == "killed by an operator"
    time.sleep(1.0)
    assert _left(engine_client, ctx.run_id) == []
    logs = list((executor.log_dir).rglob("*.log"))
    assert any(f"run {ctx.run_id} killed" in p.read_text() for p in logs)


@docker_engine
@pytest.mark.timeout(240)
def test_real_container_of_an_agent_killed_with_its_runs_is_removed_at_its_restart(
    zk_hosts, mongo_server, mongo_db_name, tmp_path, store, engine_client
):
    # kill -9 the agent, its run guard and the run's child: nothing stops the container; the
    # agent's next start (same id) removes it
    import psutil
    from test_cluster import Cluster

    from cloudtask.clock import utcnow

    cluster = Cluster(zk_hosts, mongo_server.uri, mongo_db_name, tmp_path)
    at = (utcnow() + timedelta(seconds=3)).isoformat().replace("+00:00", "Z")
    make_task(
        store,
        "boxed",
        schedule={"at": at},
        command=None,
        container={"image": IMAGE, "args": ["sleep", "300"]},
    )
    try:
        cluster.center("c1")
        agent = cluster.agent("a-boxed")
        running = wait_for(
            lambda: engine_client.containers.list(filters={"label": f"{LABEL_AGENT}=a-boxed"}),
            timeout=60,
            message="the container never ran",
        )
        run_id = running[0].labels[LABEL_RUN]
        tree = psutil.Process(agent.pid).children(recursive=True)
        assert any("cloudtask.agent.containerrun" in " ".join(p.cmdline()) for p in tree)
        for proc in [psutil.Process(agent.pid), *tree]:
            proc.kill()
        agent.wait(timeout=30)
        cluster.procs.pop("a-boxed")
        time.sleep(1.0)
        (left,) = _left(engine_client, run_id)
        left.reload()
        assert left.status == "running"  # nobody stopped it
        cluster.agent("a-boxed")
        wait_for(
            lambda: _left(engine_client, run_id) == [],
            timeout=60,
            message="the restarted agent did not remove its earlier life's container",
        )
    finally:
        cluster.stop_all()
        for c in engine_client.containers.list(
            all=True, filters={"label": f"{LABEL_AGENT}=a-boxed"}
        ):
            c.remove(force=True)


# --- the web site shows them -------------------------------------------------------------------


@pytest.fixture
def app(store):
    from helpers import make_web_app

    return make_web_app(store)


def test_the_task_page_shows_a_container_and_its_requirements(client, store, viewer):
    task = make_task(
        store,
        "boxed",
        command=None,
        container={"image": "alpine:3.20", "args": ["sh", "-c", "echo hi"]},
        requires={"os": "linux", "zone": "eu-1"},
        mode="all",
    )
    answer = client.get(f"/tasks/{task['_id']}")
    page = answer.get_data(as_text=True)
    assert answer.status_code == 200
    assert "container alpine:3.20 sh -c echo hi" in page
    requires = page.split('id="task-requires"', 1)[1].split("</span>)", 1)[0]
    assert "os=linux" in requires and "zone=eu-1" in requires


def test_the_task_form_edits_a_container_as_json_and_requires_in_its_field():
    from web.taskform import form_spec, spec_form

    boxed = parse_task({**BASE, "container": {"image": "alpine:3.20"}}).to_dict()
    needs = parse_task({**BASE, "command": "true", "requires": {"os": "linux"}}).to_dict()
    plain = parse_task({**BASE, "command": "true"}).to_dict()
    assert spec_form(boxed)["editor"] == "json"
    assert json.loads(spec_form(boxed)["spec_json"])["container"]["image"] == "alpine:3.20"
    assert spec_form(plain)["editor"] != "json"  # (the fields lose nothing of this one)
    form = spec_form(needs)
    assert form["editor"] == "fields" and form["requires"] == "os=linux"
    assert parse_task(form_spec(form)[0]).to_dict() == needs
