"""Container tasks on the agent: the Docker engine's side of a task's ``container``.

How a container run goes (decided once, here):

* The run's process is a small child program, ``python -m cloudtask.agent.containerrun``
  (:func:`container_argv` builds its command line), started like any task process: by the
  run guard, in its own process group, its output read into the run's tail and daily log,
  its timeout and kill kept by the executor. The child creates the container through the
  engine's API (the ``docker`` package, the ``container`` extra), pulls the image first if
  the engine does not have it, starts it, streams its output (stdout and stderr, in order)
  to its own stdout, waits for it, removes it, and exits with the container's exit code, so
  the run's status is the container's (0 succeeded, else failed).
* Timeout and kill: the executor ends the run's process tree with SIGTERM, then SIGKILL after
  ``agent.kill_grace``. The child turns SIGTERM into a stop of the container (the engine
  sends the container SIGTERM and SIGKILL ``kill_grace - 1`` seconds later), reads the rest
  of its output and removes it.
* What is left when the child could not finish: a SIGKILL before the container was removed,
  an engine that did not answer in time, an agent killed with its runs. Every container is
  labelled ``cloudtask.run_id``, ``cloudtask.agent`` and ``cloudtask.task``; after each
  container run ends, the agent removes (forcibly: killed first) any container still
  labelled with that run's id (:func:`remove_run_containers`), and a restarted agent's
  recovery removes every container labelled with its agent id (:func:`remove_agent_containers`),
  since none of its earlier life's runs goes on.
* The engine: ``agent.docker_host`` if set (``unix:///var/run/docker.sock``,
  ``tcp://host:2376``, ``npipe:////./pipe/docker_engine``, ``ssh://user@host``), else the
  agent's ``DOCKER_HOST`` (with ``DOCKER_TLS_VERIFY`` and ``DOCKER_CERT_PATH``), else the
  engine's default socket.

The container gets the task's ``env`` (its stored secrets opened), a manual run's parameters,
the run's ``CLOUDTASK_*`` variables (run id, task, attempt, shard...) and ``container.env``
on top; never the agent's own environment.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

from ..containerspec import ContainerSpec

log = logging.getLogger(__name__)

__all__ = [
    "LABEL_AGENT",
    "LABEL_RUN",
    "LABEL_TASK",
    "EngineUnavailable",
    "container_argv",
    "container_name",
    "create_kwargs",
    "engine",
    "remove_agent_containers",
    "remove_run_containers",
    "stop_timeout",
]

LABEL_RUN = "cloudtask.run_id"
LABEL_AGENT = "cloudtask.agent"
LABEL_TASK = "cloudtask.task"
ENGINE_TIMEOUT = 30.0  # seconds any one call to the engine may take (a pull: per read)
CLEANUP_TIMEOUT = 10.0  # seconds the agent's removal of leftovers may wait for the engine
DEFAULT_SOCKET = "/var/run/docker.sock"
# the agent's variables that say where its engine is and how to reach it (docker-py reads
# them): a run's process gets none of the agent's environment, so they are on its command line
ENGINE_ENV = ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH")
MISSING_PACKAGE = (
    "container tasks need the docker package on the agent: pip install 'cloudtask[container]'"
)


class EngineUnavailable(Exception):
    """The Docker engine cannot be used (no client package, not reachable); says why."""


def container_name(run_id: str) -> str:
    """The container's name: ``cloudtask-<run id>`` (a run id is 24 hex digits)."""
    return f"cloudtask-{run_id}"


def stop_timeout(kill_grace: float) -> int:
    """Seconds the engine waits after SIGTERM before it kills a stopped container: a second
    less than the kill grace, so the child has the last second to read and remove it."""
    return max(0, int(kill_grace) - 1)


def create_kwargs(
    spec: ContainerSpec, *, run_id: str, agent_id: str, task_name: str, env: dict[str, str]
) -> dict[str, Any]:
    """The arguments of ``DockerClient.containers.create`` for one run: the image and its
    args, ``env`` (the run's variables) with ``spec.env`` on top, the bind mounts, the CPU
    and memory limits, the labels that find it again, and no automatic removal (the child
    reads the exit code first, then removes it)."""
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "command": list(spec.args) or None,
        "environment": {**env, **spec.env},
        "labels": {LABEL_RUN: run_id, LABEL_AGENT: agent_id, LABEL_TASK: task_name},
        "name": container_name(run_id),
        "detach": True,
        "stdin_open": False,
        "tty": False,
        "auto_remove": False,
    }
    if spec.volumes:  # "host:container[:ro|rw]" (the list form: one host path may be
        kwargs["volumes"] = list(spec.volumes)  # mounted twice)
    if spec.cpus is not None:
        kwargs["nano_cpus"] = int(round(spec.cpus * 1e9))
    if spec.memory is not None:
        kwargs["mem_limit"] = spec.memory
    return kwargs


def container_argv(
    spec: ContainerSpec,
    *,
    run_id: str,
    agent_id: str,
    task_name: str,
    pass_env: Iterable[str],
    docker_host: str,
    kill_grace: float,
    engine_env: dict[str, str] | None = None,
) -> list[str]:
    """The run's process: the child program with everything it needs on its command line
    (no secrets: those are in its environment, named by ``--pass-env``). Without
    ``docker_host``, ``engine_env`` (the agent's ``ENGINE_ENV`` variables) say where the
    engine is."""
    argv = [
        sys.executable,
        "-m",
        "cloudtask.agent.containerrun",
        "--run-id",
        run_id,
        "--agent",
        agent_id,
        "--task",
        task_name,
        "--stop-timeout",
        str(stop_timeout(kill_grace)),
        "--pass-env",
        ",".join(sorted(set(pass_env))),
        "--spec",
        json.dumps(spec.to_dict(), separators=(",", ":")),
    ]
    if docker_host:
        argv += ["--docker-host", docker_host]
    else:
        for name, value in sorted((engine_env or {}).items()):
            if name in ENGINE_ENV:
                argv += ["--engine-env", f"{name}={value}"]
    return argv


def engine_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The ``ENGINE_ENV`` variables of ``environ`` (default: this process's)."""
    environ = dict(os.environ) if environ is None else environ
    return {name: environ[name] for name in ENGINE_ENV if environ.get(name)}


def engine(
    docker_host: str = "",
    timeout: float | None = ENGINE_TIMEOUT,
    environment: dict[str, str] | None = None,
) -> Any:
    """A ``docker.DockerClient`` on the engine (see the module's docstring for which), its
    calls waiting at most ``timeout`` seconds for an answer (None: for ever, for a stream of
    output), or :class:`EngineUnavailable` saying why there is none. Without
    ``docker_host`` the engine is the one ``environment``'s ``DOCKER_*`` variables name
    (default: this process's), else the default socket."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        raise EngineUnavailable(MISSING_PACKAGE) from None
    try:
        if docker_host:
            return docker.DockerClient(base_url=docker_host, timeout=timeout)
        return docker.from_env(timeout=timeout, environment=environment)
    except DockerException as e:
        env = os.environ if environment is None else environment
        where = docker_host or env.get("DOCKER_HOST") or "the default socket"
        raise EngineUnavailable(f"cannot reach the Docker engine at {where}: {e}") from None


def _engine_expected(docker_host: str) -> bool:
    """Whether an engine is configured or its default socket exists (else the agent does not
    look for leftovers at all: containers were never run here)."""
    return bool(docker_host or os.environ.get("DOCKER_HOST") or os.path.exists(DEFAULT_SOCKET))


def _remove(filters: dict[str, Any], docker_host: str, what: str, keep: set[str]) -> int:
    client = engine(docker_host, CLEANUP_TIMEOUT)
    removed = 0
    try:
        for found in client.containers.list(all=True, filters=filters):
            labels = found.labels or {}
            if labels.get(LABEL_RUN) in keep:
                continue
            try:
                found.remove(force=True)  # killed first if it still runs
                removed += 1
            except Exception as e:  # gone meanwhile, or being removed by its child
                if getattr(getattr(e, "response", None), "status_code", None) not in (404, 409):
                    raise
        if removed:
            log.warning("removed %d container(s) left by %s", removed, what)
        return removed
    finally:
        client.close()


def remove_run_containers(run_id: str, docker_host: str = "") -> int:
    """Kill and remove every container labelled with ``run_id`` (the run is over). Returns
    how many; logs (and returns 0) when the engine cannot be asked."""
    try:
        return _remove({"label": f"{LABEL_RUN}={run_id}"}, docker_host, f"run {run_id}", set())
    except Exception as e:
        log.warning("cannot look for containers left by run %s: %s", run_id, e)
        return 0


def remove_agent_containers(agent_id: str, docker_host: str = "", keep: Iterable[str] = ()) -> int:
    """Kill and remove every container an earlier life of agent ``agent_id`` left (but those
    of the runs in ``keep``). Returns how many; quiet when no engine is configured or found
    (no container ever ran here), a warning when one is configured but does not answer."""
    if not _engine_expected(docker_host):
        return 0
    try:
        return _remove(
            {"label": f"{LABEL_AGENT}={agent_id}"},
            docker_host,
            "an earlier run of this agent",
            set(keep),
        )
    except EngineUnavailable as e:
        if MISSING_PACKAGE in str(e):
            return 0
        log.warning("cannot look for containers left by an earlier run of this agent: %s", e)
        return 0
    except Exception as e:
        log.warning("cannot look for containers left by an earlier run of this agent: %s", e)
        return 0
