"""The alert settings saved from the settings page: stored, and audited with secrets hidden."""

from __future__ import annotations

from typing import Any

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
            self.store.add_audit(
                actor, "settings.alerts", "settings:alerts", hidden_secrets(before), audit_after
            )
        return before, after
