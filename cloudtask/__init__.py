"""CloudTask: a distributed task scheduler that replaces per-machine crontabs."""

__version__ = "0.1.0"
