"""Leases (``leases`` collection): the keepalive lease protocol's writes (see
:mod:`cloudtask.agent.leases` for the protocol).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from pymongo.errors import DuplicateKeyError

from ..clock import to_bson_time, utcnow
from ..runmodel import (
    SCHEMA_VERSION,
)
from .base import StoreBase, guard

log = logging.getLogger("cloudtask.store")


class Leases(StoreBase):
    """Named leases, each a document whose ``_id`` is its name."""

    def acquire_lease(
        self, name: str, holder: str, ttl: float, now: datetime | None = None
    ) -> bool:
        """Take the lease ``name`` for ``holder`` if it is free. Returns whether we hold it.

        A lease is a document whose ``_id`` is its name: the insert is the acquisition, as with
        run claims. A lease held by someone else is never judged expired by this process's
        clock (clocks of two machines may disagree by seconds): a taker that has watched it
        stay unrenewed for its whole life on its own monotonic clock takes it over with
        :meth:`take_over_lease`. ``expires_at`` is informative.
        """
        now = to_bson_time(now or utcnow())
        doc = {
            "_id": name,
            "version": SCHEMA_VERSION,
            "holder": holder,
            "acquired_at": now,
            "expires_at": to_bson_time(now + timedelta(seconds=ttl)),
        }
        try:
            guard(self.leases.insert_one, "take a lease", doc)
            return True
        except DuplicateKeyError:
            current = self.read_lease(name)
            if current is not None and current["holder"] == holder:
                return self.renew_lease(name, holder, ttl, now)
            return False

    def read_lease(self, name: str) -> dict[str, Any] | None:
        return guard(self.leases.find_one, "read a lease", {"_id": name})

    def take_over_lease(
        self,
        name: str,
        holder: str,
        ttl: float,
        seen: dict[str, Any],
        now: datetime | None = None,
    ) -> bool:
        """Take over a lease its holder stopped renewing: ``seen`` is the lease as the caller
        read it at least a whole lease life ago and again now. It is deleted only if it is
        still exactly that (holder and expiry), so a holder that renewed meanwhile keeps it
        and two takers cannot both win; then it is acquired as usual."""
        guard(
            self.leases.delete_one,
            "clear an unrenewed lease",
            {"_id": name, "holder": seen["holder"], "expires_at": seen["expires_at"]},
        )
        return self.acquire_lease(name, holder, ttl, now)

    def renew_lease(self, name: str, holder: str, ttl: float, now: datetime | None = None) -> bool:
        """Extend our lease; False if it is no longer ours (it expired and someone took it)."""
        now = to_bson_time(now or utcnow())
        current = guard(self.leases.find_one, "read a lease", {"_id": name, "holder": holder})
        if current is None:
            return False
        current["expires_at"] = to_bson_time(now + timedelta(seconds=ttl))
        result = guard(
            self.leases.replace_one, "renew a lease", {"_id": name, "holder": holder}, current
        )
        return result.matched_count == 1

    def release_lease(self, name: str, holder: str) -> None:
        guard(self.leases.delete_one, "release a lease", {"_id": name, "holder": holder})
