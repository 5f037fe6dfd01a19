"""The alert settings saved from the settings page: stored, and audited with secrets hidden;
and the settings page's test mail, audited whether or not it was sent.

Settings may name stored secrets (``smtp_password_secret``, a webhook's ``url_secret`` and
``secret_secret``): a name that is not a stored secret is refused at its path. The audit
entry lists the names (``secret_names``), never a value. When the SMTP password is a stored
secret the test mail is sent by the leading center, which opens it (the web process opens
no secret): :mod:`cloudtask.notify.testmail`.
"""

from __future__ import annotations

from typing import Any

from ..config import ALERTS_CHECKS
from ..exceptions import ValidationError
from ..notify import send_test_mail
from ..notify.settings import (
    changed_secrets,
    hidden_secrets,
    missing_secrets,
    save_settings,
    secret_names,
    stored_settings,
    validate_settings,
)
from ..notify.testmail import await_test_mail, queue_test_mail
from .base import OperationsBase

TEST_MAIL_WAIT = 30.0  # how long a test mail sent by the leading center is waited for


def follow_file(data: dict[str, Any], file_values: dict[str, Any]) -> dict[str, Any]:
    """``data`` without the keys whose value is the config file's (``file_values``, converted):
    a setting saved as the file has it is not stored, and follows the file again (the settings
    page and the API both save through this). A value that cannot be converted is kept, so
    that saving it says what is wrong."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        check = ALERTS_CHECKS.get(key) if isinstance(key, str) else None
        try:
            if check is not None and check(value) == file_values.get(key):
                continue
        except (ValueError, TypeError):
            pass
        out[key] = value
    return out


class SettingsOperations(OperationsBase):
    def save_alert_settings(
        self, actor: str, data: object, *, env_prefix: str | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Replace the stored alert settings with ``data`` (ValidationError listing every
        problem: a bad value, a ``smtp_password_env`` without ``env_prefix`` (the config's
        ``security.smtp_password_env_prefix``), a stored secret named that does not exist).
        Returns the stored values before and after; an unchanged save is not audited."""
        values, problems = validate_settings(data, env_prefix=env_prefix)
        if not problems:
            problems = missing_secrets(self.store, values)
        if problems:
            raise ValidationError(problems, source="the alert settings")
        before = stored_settings(self.store)
        after = save_settings(self.store, data, by=actor, env_prefix=env_prefix)
        if after != before:
            audit_after = hidden_secrets(after)
            if secrets := changed_secrets(before, after):
                audit_after["secrets_changed"] = secrets
            if names := secret_names(after):
                audit_after["secret_names"] = names  # which stored secrets it names
            self.audit(
                actor, "settings.alerts", "settings:alerts", hidden_secrets(before), audit_after
            )
        return before, after

    def send_test_mail(
        self, actor: str, settings: Any, to: str, *, wait: float = TEST_MAIL_WAIT
    ) -> None:
        """Send a test mail to ``to`` with ``settings`` (an AlertSettings) and audit it
        (``settings.test_mail``: to whom, through which server, sent or the error). Whatever
        the sending raises is raised again after the entry is written. When the SMTP
        password is a stored secret, the leading center sends it (waited for ``wait``
        seconds; the entry says ``via: leading center``)."""
        after: dict[str, Any] = {
            "to": to,
            "server": f"{getattr(settings, 'smtp_host', '')}:{getattr(settings, 'smtp_port', '')}",
        }
        by_center = bool(getattr(settings, "smtp_password_secret", ""))
        if by_center:
            after["via"] = "leading center"
        try:
            if by_center:
                send_test_mail(settings, to, check_only=True)  # mail off, a bad address
                await_test_mail(self.store, queue_test_mail(self.store, settings, to), wait)
            else:
                send_test_mail(settings, to)
        except Exception as e:
            after.update(sent=False, error=f"{type(e).__name__}: {e}"[:500])
            self.audit(actor, "settings.test_mail", "settings:alerts", None, after)
            raise
        after["sent"] = True
        self.audit(actor, "settings.test_mail", "settings:alerts", None, after)
