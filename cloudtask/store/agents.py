"""Agents as the leading center saw them (``agents`` collection), and the events of their
comings and goings.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from pymongo import ReplaceOne

from .. import events as ev
from ..clock import to_bson_time, utcnow
from ..runmodel import (
    SCHEMA_VERSION,
)
from .base import StoreBase, guard, read_all

log = logging.getLogger("cloudtask.store")


class AgentRecords(StoreBase):
    """The agents the leader has seen."""

    def record_agents(self, live: dict[str, dict[str, Any]], now: datetime | None = None) -> None:
        """The leader's view of the live agents (id -> registration info): each is stored
        ``online`` with its info; any other agent stored online becomes ``offline`` (kept, so
        the site can show agents that went away and when they were last seen).

        The changes are events, recorded before the agents are written: ``agent.joined`` (never
        seen before), ``agent.left`` (stored online, now gone) and ``agent.returned`` (stored
        offline, now live; or live again under a new registration, ``czxid`` in its info, that
        no leader saw go: then it left too). Their ids name the stored state they change, so
        a second leader that sees the same change (the first one stopped before writing the
        agents) records nothing twice.

        A departure is a clean stop (``agent.left`` "stopped", no alert) when the registration
        said ``leaving``, or when the agent recorded that departure itself as it stopped
        (:func:`events.agent_stopped`, the same id): the recorded reason wins, so a leader
        that never saw ``leaving`` does not report a crash. The reason is kept on the offline
        agent (``left_reason``): its return after a clean stop is no alert either.
        """
        now = to_bson_time(now or utcnow())
        known = {d["_id"]: d for d in read_all(self.agents.find({}, {"info": 0}), "read agents")}
        ops = []
        events: list[dict[str, Any]] = []
        restarted: list[str] = []
        for agent_id, info in live.items():
            stored = known.get(agent_id)
            doc = {
                "_id": agent_id,
                "version": SCHEMA_VERSION,
                "group": info.get("group", ""),
                "status": "online",
                "czxid": info.get("czxid"),  # its registration: a restart changes it
                "info": info,
                "first_seen": (stored or {}).get("first_seen", now),
                "last_seen": now,
            }
            ops.append(ReplaceOne({"_id": agent_id}, doc, upsert=True))
            if stored is None:
                events.append(ev.agent_joined(agent_id, info, now))
            elif stored.get("status") != "online":
                events.append(ev.agent_returned(agent_id, info, stored, now))
            elif None not in (stored.get("czxid"), info.get("czxid")) and stored.get(
                "czxid"
            ) != info.get("czxid"):
                # restarted between two looks: it left (a moment before now), and is back
                restarted.append(agent_id)
        gone = [a for a, d in known.items() if a not in live and d.get("status") == "online"]
        departures = []  # (stored agent, its agent.left)
        for agent_id in gone + restarted:
            full = guard(self.agents.find_one, "read an agent", {"_id": agent_id})
            if full is not None:
                at = now if agent_id in gone else now - timedelta(milliseconds=1)
                departures.append((full, ev.agent_left(full, at)))
        recorded: dict[str, Any] = {}  # departures recorded already: the agent's own clean stop
        if departures:
            ids = [left["_id"] for _, left in departures]
            cursor = self.events.find({"_id": {"$in": ids}}, {"details": 1})
            recorded = {d["_id"]: d for d in read_all(cursor, "read events")}
        for full, left in departures:
            reason = (recorded.get(left["_id"], left).get("details") or {}).get("reason")
            events.append(left)
            agent_id = full["_id"]
            if agent_id in gone:
                full.update(status="offline", last_seen=now, left_reason=reason)
                ops.append(ReplaceOne({"_id": agent_id}, full))
            else:
                before = {**known[agent_id], "left_reason": reason}
                events.append(ev.agent_returned(agent_id, live[agent_id], before, now))
        if events:
            self._record_events_quietly(events, "agent changes")
        if ops:
            guard(self.agents.bulk_write, "record agents", ops, ordered=False)

    def list_agents(self) -> list[dict[str, Any]]:
        return read_all(self.agents.find({}), "list agents")
