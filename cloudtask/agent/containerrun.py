"""The process of a container run: ``python -m cloudtask.agent.containerrun --spec JSON ...``.

Started by the agent as the run's process (see :mod:`cloudtask.agent.container` for the
whole design), it runs one container through the Docker engine's API and is its stand-in:

1. create the container (labelled with the run, the agent and the task; named
   ``cloudtask-<run id>``), pulling the image first if the engine does not have it;
2. start it and copy its output (stdout and stderr, in the order the engine gives them) to
   this process's stdout, which the agent reads into the run's tail and daily log;
3. wait for it, remove it, and exit with its exit code.

SIGTERM (the run's timeout or a kill) stops the container: the engine sends it SIGTERM and,
``--stop-timeout`` seconds later, SIGKILL; its last output is still copied, and it is
removed. A SIGTERM before it started removes it unstarted (exit 143). Problems of the engine
or the image are printed and end the run with exit code 125 (as ``docker run`` does); the
container is removed in every case this process lives to see. What a SIGKILL leaves, the
agent removes (by the run's label).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from ..containerspec import ContainerSpec, read_container
from ..exceptions import Problem
from .container import MISSING_PACKAGE, EngineUnavailable, create_kwargs, engine

ENGINE_ERROR = 125  # the engine or the image failed (what docker run exits with)
STOPPED_BEFORE_START = 143  # 128 + SIGTERM


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cloudtask.agent.containerrun",
        description="Run one task container through the Docker engine (started by an agent).",
    )
    parser.add_argument("--spec", required=True, help="the task's container, as JSON")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--pass-env", default="", help="variables passed on, comma-separated")
    parser.add_argument("--docker-host", default="")
    parser.add_argument(
        "--engine-env", action="append", default=[], help="NAME=VALUE: the agent's DOCKER_*"
    )
    parser.add_argument("--stop-timeout", type=int, default=4)
    return parser.parse_args(argv)


def _spec(text: str) -> ContainerSpec:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise SystemExit(f"containerrun: --spec is not JSON: {e}") from None
    problems: list[Problem] = []
    spec = read_container(value, problems)
    if spec is None:
        raise SystemExit("containerrun: " + "; ".join(str(p) for p in problems))
    return spec


def _say(message: str) -> None:
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()


class _Stand:
    """The container this process stands in for, and the one stop a SIGTERM asks for."""

    def __init__(self, stop_timeout: int) -> None:
        self.stop_timeout = stop_timeout
        self.container: Any = None
        self.started = False
        self.stop_asked = threading.Event()
        self._stopping = False
        self._lock = threading.RLock()  # (the signal handler may interrupt its holder)

    def on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_asked.set()
        if self.started:
            self.stop()

    def stop(self) -> None:
        """Stop the container, once, off the signal handler (the engine's call waits)."""
        with self._lock:
            if self._stopping or self.container is None:
                return
            self._stopping = True
        threading.Thread(target=self._stop, name="container-stop", daemon=True).start()

    def _stop(self) -> None:
        try:
            self.container.stop(timeout=self.stop_timeout)
        except Exception as e:  # gone already, or the engine failed: the agent cleans up
            _say(f"cannot stop the container: {e}")


def run(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    spec = _spec(args.spec)
    names = [n for n in args.pass_env.split(",") if n]
    env = {name: os.environ[name] for name in names if name in os.environ}
    stand = _Stand(args.stop_timeout)
    signal.signal(signal.SIGTERM, stand.on_signal)
    signal.signal(signal.SIGINT, stand.on_signal)
    try:
        from docker.errors import DockerException, ImageNotFound
    except ImportError:
        _say(MISSING_PACKAGE)
        return ENGINE_ERROR
    where = dict(item.split("=", 1) for item in args.engine_env if "=" in item)
    try:
        client = engine(args.docker_host, environment=where)
        streams = engine(args.docker_host, timeout=None, environment=where)  # output may pause
    except EngineUnavailable as e:
        _say(str(e))
        return ENGINE_ERROR
    kwargs = create_kwargs(
        spec, run_id=args.run_id, agent_id=args.agent, task_name=args.task, env=env
    )
    try:
        try:
            stand.container = client.containers.create(**kwargs)
        except ImageNotFound:
            _say(f"pulling image {spec.image}")
            client.images.pull(spec.image)
            stand.container = client.containers.create(**kwargs)
        if stand.stop_asked.is_set():
            return STOPPED_BEFORE_START
        stand.container.start()
        stand.started = True
        if stand.stop_asked.is_set():
            stand.stop()
        out = sys.stdout.buffer
        for chunk in streams.containers.get(stand.container.id).logs(stream=True, follow=True):
            out.write(chunk)
            out.flush()
        result = stand.container.wait()
        error = (result.get("Error") or {}).get("Message") if isinstance(result, dict) else None
        if error:
            _say(f"the engine reports: {error}")
        return int(result.get("StatusCode", ENGINE_ERROR)) if isinstance(result, dict) else 0
    except DockerException as e:
        _say(f"container {spec.image}: {e}")
        return ENGINE_ERROR
    finally:
        if stand.container is not None:
            try:
                stand.container.remove(force=True)
            except DockerException as e:
                _say(f"cannot remove the container (the agent will): {e}")
        client.close()
        streams.close()


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
