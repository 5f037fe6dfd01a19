"""The notifier: plans the deliveries of new events, then sends what is due.

Only the leading center runs it (:class:`NotifierThread` asks ``is_leader`` before every pass
and, while sending, before every message). A pass (:meth:`Notifier.run_once`):

1. reads the settings (the file, then MongoDB; re-read every few seconds) and opens the
   stored secrets they name (the SMTP password, webhook URLs and secrets) with the key ring
   of its config (``secrets.keys``);
2. plans up to ``EVENT_BATCH`` events whose ``delivery`` is "new", oldest first: inserts their
   deliveries (pending), updates the task's alert state, marks the event "planned";
3. plans the digests that are due;
4. sends the pending deliveries that are due, oldest first, taking turns between the mail
   server and each webhook URL (at most ``PER_TARGET`` per URL, ``SEND_BATCH`` in all), and
   starts no send after ``SEND_BUDGET`` seconds. When a server or receiver fails, the pass
   records the same failure on its other deliveries instead of waiting for it again: one
   dead receiver costs one timeout per pass.

Nothing here blocks scheduling: the notifier is a thread of its own and every network call
has a timeout.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from itertools import zip_longest
from typing import Any

from pymongo.errors import PyMongoError

from ..clock import stored_time
from ..config import Config
from ..exceptions import ConfigError, StoreError
from ..secretbox import SecretBox, load_box
from ..store import Store
from .deliveries import Deliveries
from .mail import DeliveryError, SmtpConnection, build_message
from .plancallbacks import PlanCallbacks
from .planner import Planner
from .settings import AlertSettings, Webhook, load_settings, resolve_secrets
from .throttle import AlertStates
from .webhook import post_event

log = logging.getLogger(__name__)

EVENT_BATCH = 100
DIGEST_BATCH = 100
SEND_BATCH = 200
PER_TARGET = 100  # per webhook URL and pass
SEND_BUDGET = 5.0  # seconds of sending per pass before the rest waits for the next pass
SETTINGS_TTL = 5.0  # how often the stored settings are read again


def _epoch(now: float | datetime | None) -> float:
    if now is None:
        return time.time()
    if isinstance(now, datetime):
        moment = stored_time(now)
        assert moment is not None
        return moment.timestamp()
    return float(now)


class Notifier:
    """One pass at a time; see the module docstring. ``holder`` names it in claims."""

    def __init__(
        self,
        store: Store,
        cfg: Config,
        *,
        holder: str | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.holder = holder or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self.environ = environ
        self.deliveries = Deliveries(store)
        self.states = AlertStates(store)
        self.planner = Planner(store, self.deliveries, self.states)
        self._settings: AlertSettings | None = None
        self._settings_read = -SETTINGS_TTL
        self._indexed = False
        self.plan_callbacks = PlanCallbacks(store, self.box)  # (plancallbacks.py)
        self._box: SecretBox | None = None
        self._box_problem = ""
        self._box_read = False

    def box(self) -> tuple[SecretBox | None, str]:
        """The key ring of ``secrets.keys`` (None: none), and why it cannot be read."""
        if not self._box_read:
            try:
                self._box = load_box(self.cfg.secrets.keys, self.environ)
            except ConfigError as e:
                self._box_problem = str(e)
                log.error("the notifier cannot open stored secrets: %s", e)
            self._box_read = True
        return self._box, self._box_problem

    def settings(self, fresh: bool = False) -> AlertSettings:
        """The settings, the stored secrets they name opened (read again every few seconds)."""
        if fresh or self._settings is None or time.monotonic() - self._settings_read > SETTINGS_TTL:
            settings = load_settings(self.store, self.cfg, self.environ)
            box, problem = self.box()
            self._settings = resolve_secrets(settings, self.store, box, problem)
            self._settings_read = time.monotonic()
        return self._settings

    def run_once(
        self,
        now: float | datetime | None = None,
        *,
        keep_going: Callable[[], bool] | None = None,
    ) -> dict[str, int]:
        """One pass. ``now`` (epoch seconds or a datetime; default the clock) decides what is
        due; ``keep_going`` is asked before each send (False: stop, the leader changed).
        Returns counts: events, deliveries (new), held, digests, sent, retried, failed,
        errors."""
        t = _epoch(now)
        counts = dict.fromkeys(
            ("events", "deliveries", "held", "digests", "sent", "retried", "failed", "errors"), 0
        )
        if not self._indexed:
            self.deliveries.ensure_indexes()
            self.states.ensure_indexes()
            self._indexed = True
        s = self.settings()
        self.planner.forget_tasks()
        self._plan_events(s, t, counts)
        self._plan_digests(s, t, counts)
        self._send(s, t, counts, keep_going or (lambda: True))
        self._call_back_plans(s, t, keep_going or (lambda: True), counts)
        return counts

    def _call_back_plans(
        self, s: AlertSettings, now: float, keep_going: Callable[[], bool], counts: dict[str, int]
    ) -> None:
        """The plans' state changes, to their callback URLs (after the alerts: a slow
        receiver of one plan holds up no alert)."""
        try:
            done = self.plan_callbacks.run_once(now, policy=s.egress, keep_going=keep_going)
        except (StoreError, PyMongoError) as e:
            log.warning("cannot call back plans this pass: %s", e)
            return
        except Exception:
            log.exception("calling back plans failed")
            counts["errors"] += 1
            return
        counts["callbacks"] = done["posts"]

    # --- planning ---------------------------------------------------------------------------

    def _plan_events(self, s: AlertSettings, now: float, counts: dict[str, int]) -> None:
        for event in self.store.new_events(limit=EVENT_BATCH):
            try:
                planned = self.planner.plan_event(event, s, now)
            except (StoreError, PyMongoError):
                raise  # MongoDB trouble: the event stays "new" and is planned next pass
            except Exception:
                # a bug, or an event no code can read: logged, and it must not stop the rest
                log.exception("cannot plan the deliveries of event %s", event.get("_id"))
                counts["errors"] += 1
            else:
                counts["deliveries"] += planned["deliveries"]
                counts["held"] += planned["held"]
            self.store.set_event_delivery(event["_id"], "planned")
            counts["events"] += 1

    def _plan_digests(self, s: AlertSettings, now: float, counts: dict[str, int]) -> None:
        for state in self.states.digests_due(now, DIGEST_BATCH):
            new = self.planner.plan_digests(state, s, now)
            counts["deliveries"] += new
            counts["digests"] += new

    # --- sending ----------------------------------------------------------------------------

    def _pick(self, now: float) -> list[dict[str, Any]]:
        """The due deliveries of this pass, taken in turns from each target (oldest first
        within one), at most PER_TARGET of a webhook URL and SEND_BATCH in all: a slow
        receiver with a long queue does not keep the others waiting."""
        queues: dict[str, list[dict[str, Any]]] = {}
        for doc in self.deliveries.due(now, SEND_BATCH * 3):
            queue = queues.setdefault(_target_key(doc), [])
            if doc.get("channel") == "mail" or len(queue) < PER_TARGET:
                queue.append(doc)  # mail is one server on one connection: no cap but the batch
        picked: list[dict[str, Any]] = []
        for row in zip_longest(*queues.values()):
            picked += [doc for doc in row if doc is not None]
        return picked[:SEND_BATCH]

    def _send(
        self,
        s: AlertSettings,
        now: float,
        counts: dict[str, int],
        keep_going: Callable[[], bool],
    ) -> None:
        picked = self._pick(now)
        if not picked:
            return
        if any(doc.get("once") for doc in picked):  # a test mail tests the settings just saved
            s = self.settings(fresh=True)
        smtp = SmtpConnection(s)
        broken: dict[str, str] = {}  # target -> the error that broke it in this pass
        started = time.monotonic()
        try:
            for doc in picked:
                target = _target_key(doc)
                out_of_time = time.monotonic() - started > SEND_BUDGET
                if target not in broken and (out_of_time or not keep_going()):
                    break  # the rest is due still, and goes first next pass
                claimed = self.deliveries.claim(doc, now, self.holder)
                if claimed is None:
                    continue  # another notifier has it
                if target in broken:
                    error = f"not tried: {broken[target]}"
                    self._failed(claimed, now, error, counts)
                    continue
                try:
                    self._deliver(claimed, s, smtp, now)
                except DeliveryError as e:
                    if e.whole_target:
                        broken[target] = str(e)
                    self._failed(claimed, now, str(e), counts)
                else:
                    self.deliveries.mark_sent(claimed, now)
                    counts["sent"] += 1
                    log.info("sent %s to %s", claimed["_id"], claimed["target"])
        finally:
            smtp.close()

    def _deliver(
        self, doc: dict[str, Any], s: AlertSettings, smtp: SmtpConnection, now: float
    ) -> None:
        if doc["channel"] == "mail":
            msg = build_message(
                settings=s,
                to=doc["target"],
                subject=doc.get("subject") or "[CloudTask]",
                body=doc.get("body") or "",
                delivery_id=doc["_id"],
                kind=doc.get("kind") or "event",
                date=stored_time(doc.get("created_ts")) or stored_time(now),
            )
            smtp.send(msg, doc["target"])
            return
        if doc["channel"] == "webhook":
            hook = _find_webhook(s, doc)
            if hook is None:
                raise DeliveryError(
                    f"the webhook {doc['target']} is no longer in the alert settings",
                    whole_target=False,
                )
            if hook.problem:
                raise DeliveryError(f"the webhook {hook.label} cannot be used: {hook.problem}")
            post_event(
                hook.url,
                (doc.get("body") or "").encode("utf-8"),
                secret=hook.secret,
                kind=doc.get("kind") or "event",
                delivery_id=doc["_id"],
                timeout=s.webhook_timeout,
                policy=s.egress,
                name=hook.label,
            )
            return
        raise DeliveryError(f"unknown channel {doc['channel']!r}", whole_target=False)

    def _failed(self, doc: dict[str, Any], now: float, error: str, counts: dict[str, int]) -> None:
        status = self.deliveries.mark_failed_attempt(doc, now, error)
        attempts = doc["attempts"] + 1
        if status == "failed":
            counts["failed"] += 1
            log.error(
                "gave up on %s to %s after %d attempts: %s",
                doc["_id"],
                doc["target"],
                attempts,
                error,
            )
        else:
            counts["retried"] += 1
            log.warning(
                "sending %s to %s failed (attempt %d), will retry: %s",
                doc["_id"],
                doc["target"],
                attempts,
                error,
            )


def _target_key(doc: dict[str, Any]) -> str:
    """Mail shares one server; each webhook URL is a receiver of its own."""
    return "mail" if doc.get("channel") == "mail" else f"webhook {doc.get('target')}"


def _find_webhook(s: AlertSettings, doc: dict[str, Any]) -> Webhook | None:
    """The webhook of a delivery: the one at its index, else the one of the same target
    (its URL, or ``secret:NAME`` for a URL kept as a stored secret)."""
    n = doc.get("webhook")
    if isinstance(n, int) and 0 <= n < len(s.webhooks) and s.webhooks[n].label == doc["target"]:
        return s.webhooks[n]
    return next((h for h in s.webhooks if h.label == doc["target"]), None)


class NotifierThread:
    """Runs :meth:`Notifier.run_once` about every ``interval`` seconds while ``is_leader()``.

    Errors of a pass are logged and the next pass tries again; :meth:`stop` waits for the
    pass in progress (every network call in it has a timeout)."""

    def __init__(
        self,
        store: Store,
        cfg: Config,
        is_leader: Callable[[], bool],
        *,
        interval: float = 1.0,
    ) -> None:
        self.notifier = Notifier(store, cfg)
        self.is_leader = is_leader
        self.interval = interval
        self.passes = 0  # passes made while leading
        self.ticks = 0  # wake-ups, leading or not
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing_since: float | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="notifier", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """Run a pass now (e.g. right after events were recorded)."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    def _leading(self) -> bool:
        try:
            return bool(self.is_leader()) and not self._stop.is_set()
        except Exception:
            log.exception("cannot tell whether this center leads; not notifying")
            return False

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._leading():
                try:
                    self.notifier.run_once(keep_going=self._leading)
                    if self._failing_since is not None:
                        log.info("the notifier works again")
                        self._failing_since = None
                except (StoreError, PyMongoError) as e:
                    self._log_failure(str(e))
                except Exception:
                    log.exception("a notifier pass failed; the next one tries again")
                self.passes += 1
            self.ticks += 1
            self._wake.wait(self.interval)
            self._wake.clear()

    def _log_failure(self, message: str) -> None:
        """MongoDB trouble is logged when it starts and then once a minute, not every second."""
        now = time.monotonic()
        if self._failing_since is None or now - self._failing_since > 60:
            log.warning("notifier pass failed, retrying every %gs: %s", self.interval, message)
            self._failing_since = now
