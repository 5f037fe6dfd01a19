"""Plans: submit (validated whole first: a receipt, or every error and nothing stored), read,
cancel a plan or one item."""

from __future__ import annotations

from typing import Any

from ..exceptions import Conflict, NotFound, Problem, ValidationError
from ..plans import parse_plan, plan_from_xml
from ..runmodel import FINISHED_STATUSES
from ..zkpaths import request_kill
from .base import OperationsBase


class PlanOperations(OperationsBase):
    def submit_plan(self, actor: str, data: Any, *, xml: bool = False) -> dict[str, Any]:
        """Validate the whole plan (JSON form, or XML with ``xml``), then store it: its items
        wait ``queued`` for a free agent of their type. ValidationError lists every problem
        and nothing is stored. Returns the receipt (see ``Store.submit_plan``)."""
        plan = parse_plan(plan_from_xml(data) if xml else data)
        name = plan.callback_secret
        if name is not None and name not in self.store.stored_secret_names([name]):
            raise ValidationError(
                [Problem("callback_secret", f"no secret named {name!r}: store it first")],
                source="plan",
            )
        receipt = self.store.submit_plan(plan, submitter=actor)
        self.audit(
            actor,
            "plan.submit",
            f"plan:{receipt['plan_id']}",
            None,
            {
                "name": plan.name,
                "accepted": receipt["accepted"],
                "existing": receipt["existing"],
                "types": sorted({item.type for item in plan.items}),
            },
        )
        if receipt["accepted"]:
            self._signal("runs")
        return receipt

    def cancel_plan(self, actor: str, plan_id: str) -> dict[str, Any]:
        """Cancel a plan: its waiting items are dropped (``killed``), its running ones
        killed through their agents, and no further attempt is queued."""
        result = self.store.cancel_plan(plan_id, by=actor)
        try:
            killing = self._kill_all(result["running"], f"plan cancelled by {actor}")
        except Conflict:  # cancelled and its waiting items dropped all the same: audited
            self.audit(
                actor,
                "plan.cancel",
                f"plan:{plan_id}",
                None,
                {
                    "dropped": result["cancelled"],
                    "killing": 0,
                    "not_killed": len(result["running"]),
                },
            )
            raise
        self.audit(
            actor,
            "plan.cancel",
            f"plan:{plan_id}",
            None,
            {"dropped": result["cancelled"], "killing": killing},
        )
        return {"plan_id": plan_id, "dropped": result["cancelled"], "killing": killing}

    def cancel_item(self, actor: str, item_id: str) -> dict[str, Any]:
        """Cancel one item: its waiting attempt is dropped, a running one killed."""
        attempts = self.store.item_attempts(item_id)
        if not attempts or attempts[0].get("trigger") != "plan":
            raise NotFound(f"no plan item {item_id!r}")
        latest = attempts[-1]
        if latest["status"] in FINISHED_STATUSES:
            raise Conflict(f"item {item_id} is over (its last attempt {latest['status']})")
        reason = f"cancelled by {actor}"
        dropped = latest["status"] == "queued" and self.store.cancel_pending_run(
            latest["_id"], reason
        )
        killing = 0 if dropped else self._kill_all([self.store.get_run(latest["_id"])], reason)
        self.audit(
            actor,
            "plan.item.cancel",
            f"item:{item_id}",
            {"status": latest["status"]},
            {"dropped": bool(dropped), "killing": killing},
        )
        return {"item_id": item_id, "dropped": bool(dropped), "killing": killing}

    def _kill_all(self, runs: list[dict[str, Any]], reason: str) -> int:
        """Ask the agents of these runs to kill them (through ZooKeeper); how many asked."""
        asked = 0
        for run in runs:
            if run.get("agent") is None or run["status"] in FINISHED_STATUSES:
                continue
            if self.zk is None:
                raise Conflict(
                    "killing running items needs the cluster (ZooKeeper): this web site or "
                    "command has no zookeeper.hosts configured"
                )
            request_kill(self.zk, self.paths, run["agent"], run["_id"], reason)
            asked += 1
        return asked
