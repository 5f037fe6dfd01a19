"""The settings page's test mail, sent by the leading center.

When the SMTP password is a stored secret (``smtp_password_secret``), the web process cannot
send the test mail itself: it opens no secret. It stores the message as a delivery of its own
(``test:<address>:<time>``, marked ``once``: a failure is final, never retried) and waits
for the leading center's notifier, which opens the password with its key ring and sends it
on its next pass (about a second), like any alert. The answer is the delivery's: sent, or
its error; when no center sent it in time, the delivery is withdrawn (marked failed) so a
center that comes up later does not mail a stale test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..clock import utcnow
from ..exceptions import CloudTaskError
from ..store import Store
from .content import test_body
from .deliveries import Deliveries, new_delivery
from .settings import AlertSettings

POLL_SECONDS = 0.2


def queue_test_mail(store: Store, settings: AlertSettings, to: str) -> str:
    """Store a test mail to ``to`` for the leading center to send now; its delivery id."""
    now = utcnow().timestamp()
    delivery_id = f"test:{to}:{now:.6f}"
    doc = new_delivery(
        delivery_id,
        event_id=delivery_id,
        kind="test",
        channel="mail",
        target=to,
        now=now,
        subject=f"[CloudTask] TEST mail from {settings.base_url}",
        body=test_body(settings.base_url, settings.sender),
        once=True,
    )
    Deliveries(store).insert([doc])
    return delivery_id


def await_test_mail(
    store: Store,
    delivery_id: str,
    timeout: float,
    *,
    sleep: Callable[[float], Any] = time.sleep,
) -> None:
    """Wait until the leading center sent the test mail (return) or failed to
    (CloudTaskError with its error); after ``timeout`` seconds, withdraw it and say so."""
    deliveries = Deliveries(store)
    deadline = time.monotonic() + timeout
    extended = False
    while True:
        doc = deliveries.get(delivery_id)
        if doc is None:
            raise CloudTaskError("the test mail was not sent: its delivery is gone")
        if doc["status"] == "sent":
            return
        if doc["status"] == "failed":
            raise CloudTaskError(f"the test mail was not sent: {doc.get('last_error')}")
        if time.monotonic() >= deadline:
            withdrawn = {
                **doc,
                "status": "failed",
                "last_error": f"withdrawn: no leading center sent it within {timeout:g}s",
            }
            if doc["claims"] == 0 and deliveries.store.replace_delivery(
                doc, withdrawn, "withdraw a test mail"
            ):
                raise CloudTaskError(
                    f"the test mail was not sent: no leading center sent it within {timeout:g}s "
                    "(the SMTP password is a stored secret, which only the leading center "
                    "opens: is a center running?)"
                )
            if extended:
                raise CloudTaskError(
                    "the test mail may not have been sent: the leading center took it but "
                    f"gave no answer within {2 * timeout:g}s"
                )
            extended = True  # a center is sending it: wait once more for its answer
            deadline = time.monotonic() + timeout
        sleep(POLL_SECONDS)
