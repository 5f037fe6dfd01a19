"""The alert settings saved from the settings page: stored, and audited with secrets hidden;
and the settings page's test mail, audited whether or not it was sent."""

from __future__ import annotations

from typing import Any

from ..notify import send_test_mail
from ..notify.settings import changed_secrets, hidden_secrets, save_settings, stored_settings
from .base import OperationsBase


class SettingsOperations(OperationsBase):
    def save_alert_settings(
        self, actor: str, data: object
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Replace the stored alert settings with ``data`` (ValidationError listing every
        problem). Returns the stored values before and after; an unchanged save is not
        audited."""
        before = stored_settings(self.store)
        after = save_settings(self.store, data, by=actor)
        if after != before:
            audit_after = hidden_secrets(after)
            if secrets := changed_secrets(before, after):
                audit_after["secrets_changed"] = secrets
            self.audit(
                actor, "settings.alerts", "settings:alerts", hidden_secrets(before), audit_after
            )
        return before, after

    def send_test_mail(self, actor: str, settings: Any, to: str) -> None:
        """Send a test mail to ``to`` with ``settings`` (an AlertSettings) and audit it
        (``settings.test_mail``: to whom, through which server, sent or the error). Whatever
        the sending raises is raised again after the entry is written."""
        after: dict[str, Any] = {
            "to": to,
            "server": f"{getattr(settings, 'smtp_host', '')}:{getattr(settings, 'smtp_port', '')}",
        }
        try:
            send_test_mail(settings, to)
        except Exception as e:
            after.update(sent=False, error=f"{type(e).__name__}: {e}"[:500])
            self.audit(actor, "settings.test_mail", "settings:alerts", None, after)
            raise
        after["sent"] = True
        self.audit(actor, "settings.test_mail", "settings:alerts", None, after)
