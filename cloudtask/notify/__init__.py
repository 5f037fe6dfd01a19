"""Alerts: mail and webhooks for the events in MongoDB, sent by the leading center.

* :mod:`.settings`: the effective settings (config ``alerts``, overridden by the document
  ``settings/alerts`` the settings page saves): :func:`load_settings`, :func:`save_settings`.
* :mod:`.planner` and :mod:`.throttle`: who gets what, and a failing task's digests.
* :mod:`.deliveries`: the ``deliveries`` collection, pending -> sent, with retries.
* :mod:`.mail` (smtplib), :mod:`.webhook` (signed JSON POSTs), :mod:`.content` (the text).
* :mod:`.notifier`: :class:`Notifier` (one pass: ``run_once(now)``) and
  :class:`NotifierThread` (a pass about every second while ``is_leader()``).
"""

from __future__ import annotations

from .mail import DeliveryError, send_test_mail
from .notifier import Notifier, NotifierThread
from .settings import AlertSettings, Webhook, load_settings, save_settings, stored_settings

__all__ = [
    "AlertSettings",
    "DeliveryError",
    "Notifier",
    "NotifierThread",
    "Webhook",
    "load_settings",
    "save_settings",
    "send_test_mail",
    "stored_settings",
]
