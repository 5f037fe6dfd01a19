"""Starting a task's process in its own group, and killing its whole tree.

A run's processes are found three ways, so that no grandchild survives a timeout:
the live tree under the main process (psutil), the process group the run was started in
(POSIX: a new session per run), and any process whose environment carries the run's
``CLOUDTASK_RUN_ID`` (this catches a grandchild that called setsid() and was re-parented).
Everything is terminated first, then killed after a grace period.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import psutil

log = logging.getLogger(__name__)

IS_POSIX = os.name == "posix"


def popen_group_kwargs() -> dict[str, Any]:
    """Popen arguments that put the child in a group of its own, on each platform."""
    if IS_POSIX:
        return {"start_new_session": True}
    return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _group_members(pgid: int) -> list[psutil.Process]:
    if not IS_POSIX:
        return []
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                members.append(p)
        except (OSError, psutil.Error):
            continue
    return members


def _with_environment(matches: Callable[[dict[str, str]], bool]) -> list[psutil.Process]:
    """Processes whose environment ``matches`` (reads every process's environment: slow-ish)."""
    found = []
    me = os.getpid()
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        try:
            if matches(p.environ()):
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def _tagged(run_id: str) -> list[psutil.Process]:
    """The processes of one run, wherever they were re-parented."""
    return _with_environment(lambda env: env.get("CLOUDTASK_RUN_ID") == run_id)


def process_identity(pid: int | None = None) -> str:
    """``pid:start-time-ms``: names one process for its whole life (pids are reused)."""
    p = psutil.Process(pid)
    return f"{p.pid}:{round(p.create_time() * 1000)}"


def _is_alive(identity: str) -> bool:
    try:
        pid = int(identity.split(":", 1)[0])
        return process_identity(pid) == identity
    except (ValueError, psutil.Error):
        return False


def orphans_of_agent(agent_id: str) -> list[psutil.Process]:
    """Processes of runs started by this agent id in an agent process that has since died.

    Runs carry ``CLOUDTASK_AGENT_PROCESS`` (the starting agent's :func:`process_identity`), so a
    live agent's runs are never taken for orphans, even another one with the same id.
    """
    return _with_environment(
        lambda env: (
            env.get("CLOUDTASK_AGENT") == agent_id
            and bool(env.get("CLOUDTASK_RUN_ID"))
            and not _is_alive(env.get("CLOUDTASK_AGENT_PROCESS", ""))
        )
    )


def end_processes(procs: list[psutil.Process], grace: float) -> None:
    """Terminate, wait ``grace``, kill what is left."""
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def end_run_processes(run_id: str, grace: float) -> int:
    """End every process tagged with ``run_id``, wherever it was re-parented. Returns how many."""
    procs = _tagged(run_id)
    if procs:
        end_processes(procs, grace)
    return len(procs)


def run_processes(proc: subprocess.Popen, run_id: str | None) -> list[psutil.Process]:
    """Every process that belongs to a run, except the main one (which Popen owns)."""
    seen: dict[int, psutil.Process] = {}
    for p in (
        _descendants(proc.pid) + _group_members(proc.pid) + (_tagged(run_id) if run_id else [])
    ):
        if p.pid != proc.pid:
            seen.setdefault(p.pid, p)
    return list(seen.values())


def _signal_group(pgid: int, sig: int) -> None:
    if IS_POSIX:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_tree(proc: subprocess.Popen, run_id: str | None, grace: float = 5.0) -> int:
    """Terminate a run's main process and every process of its run; kill what is left after grace.

    Returns how many processes were signalled. The main process is reaped by Popen (its exit
    code stays right); the others are waited for with psutil.
    """
    others = run_processes(proc, run_id)
    for p in others:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _signal_group(proc.pid, signal.SIGTERM)
    if proc.poll() is None:
        try:
            proc.terminate()
        except OSError:
            pass
    deadline = time.monotonic() + grace
    _, alive = psutil.wait_procs(others, timeout=grace)
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    if IS_POSIX:
        _signal_group(proc.pid, signal.SIGKILL)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        try:
            proc.kill()
        except OSError:
            pass
        proc.wait()
    psutil.wait_procs(alive, timeout=5)
    return len(others) + 1


def reap_leftovers(proc: subprocess.Popen, grace: float = 2.0) -> int:
    """After the main process ended, end what it left running in its group (POSIX).

    A run owns its processes: background children that outlive the main process would
    otherwise pile up across runs and hold the output pipe open.
    """
    if not IS_POSIX:
        return 0
    try:
        os.killpg(proc.pid, 0)  # one cheap syscall: is anything left in the group at all?
    except (ProcessLookupError, PermissionError):
        return 0
    members = _group_members(proc.pid)
    if not members:
        return 0
    _signal_group(proc.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=grace)
    if alive:
        _signal_group(proc.pid, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
    return len(members)
