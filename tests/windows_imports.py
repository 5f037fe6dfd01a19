"""Run by tests/test_windows_paths.py in a fresh interpreter: removes what only POSIX has from
``os``, ``signal`` and ``socket``, then imports every CloudTask module, as Windows would.
Prints "all imported", or each module that failed and why.

The libraries CloudTask uses are imported first, as they are: they have Windows code paths of
their own, which this machine cannot take."""

import importlib
import os
import pkgutil
import signal
import socket

LIBRARIES = (
    "subprocess", "asyncio", "multiprocessing", "selectors", "platform", "email", "smtplib",
    "http.server", "concurrent.futures", "logging.handlers", "kazoo.client", "pymongo",
    "croniter", "flask", "flask_login", "psutil", "waitress", "click", "cryptography.fernet",
    "uhashring", "prometheus_client", "icalendar", "recurring_ical_events", "defusedxml",
    "tzlocal",
)  # fmt: skip
POSIX_ONLY = {
    socket: ("CMSG_SPACE", "CMSG_LEN", "SCM_RIGHTS", "AF_UNIX"),
    signal: (
        "SIGKILL", "SIGSTOP", "SIGCONT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM",
        "SIGCHLD", "SIGPIPE",
    ),
    os: (
        "killpg", "getpgid", "setsid", "setpgid", "getuid", "geteuid", "fork", "setuid",
        "initgroups", "getpgrp",
    ),
}  # fmt: skip

for lib in LIBRARIES:
    importlib.import_module(lib)
for module, names in POSIX_ONLY.items():
    for name in names:
        if hasattr(module, name):
            delattr(module, name)

cloudtask = importlib.import_module("cloudtask")
failed = []
for info in pkgutil.walk_packages(cloudtask.__path__, "cloudtask."):
    if ".testing" in info.name or info.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(info.name)
    except Exception as e:  # noqa: BLE001  (each failure is the answer)
        failed.append(f"{info.name}: {type(e).__name__}: {e}")
print("\n".join(failed) or "all imported")
