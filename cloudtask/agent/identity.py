"""An agent's id: stable across restarts, so a restarted agent finds its earlier life.

The id is the configured one (``agent.id``), else the one kept in ``<data_dir>/agent-id``,
else a new one (``<host>-<6 hex digits>``) written there for the next start. What an agent
recovers after a crash (its journal, its orphaned processes, its runs in MongoDB) is found
by this id, so ids must be unique: the cluster refuses a second live agent with the same id
(see registration.py).

Example::

    agent_id = resolve_agent_id(config.agent.id, Path(config.agent.data_dir))
"""

from __future__ import annotations

import re
import secrets
import socket
from pathlib import Path


def resolve_agent_id(configured: str, data_dir: Path) -> str:
    """The configured id, else the one kept in ``<data_dir>/agent-id``, else a new one kept there."""
    if configured:
        return configured
    path = data_dir / "agent-id"
    try:
        stored = path.read_text(encoding="utf-8").strip()
        if stored:
            return stored
    except FileNotFoundError:
        pass
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40].strip(".-_") or "agent"
    agent_id = f"{host}-{secrets.token_hex(3)}"
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(agent_id + "\n", encoding="utf-8")
    return agent_id
