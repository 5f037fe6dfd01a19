"""The API's alert settings (admin only, like the settings page): SMTP, recipients, webhooks.

``GET /settings`` shows each setting's effective value and where it comes from: ``database``
(saved from the settings page or this API) or ``file`` (the config file to edit, named by
``config_file``; its environment overrides, or the default), with the file's value next to
it. Secrets are write-only: the SMTP password and each webhook's signing secret are never
answered, only whether one is set (``set``, ``secret_set``).

``PATCH /settings`` changes the keys given (``null``: back to the file's value); ``PUT
/settings`` replaces the whole stored set (a key left out follows the file); ``DELETE
/settings/{key}`` puts one key back to the file's value. Like the page, a value equal to the
file's is not stored, and a write-only secret the body leaves out is kept: the SMTP password
unless ``smtp_password`` is ``null`` (or a stored secret is named instead), a webhook's
signing secret when the webhook with the same URL had one. Everything is checked and audited
by the operations the page saves through (``settings.alerts``, secrets hidden), and a bad
value is a 422 naming its path (``webhooks[0].url``) with nothing stored.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from flask import current_app, jsonify

from cloudtask.config import AlertsConfig, Config, config_origin, email_problem
from cloudtask.exceptions import Problem, ValidationError
from cloudtask.notify.settings import SETTING_KEYS, SETTINGS_ID, plain, stored_settings
from cloudtask.operations.settings import follow_file

from ..auth import requires
from ..context import actor, jsonable, ops, store
from ..openapi import JSON, Reply, path_param, ref
from ..settings import send_test_mail_now
from .hardening import ApiError, json_body, unknown_keys
from .table import api

PASSWORD = "smtp_password"
KEY_PARAM = path_param("key", "The setting's name (" + ", ".join(SETTING_KEYS) + ")")
SETTINGS_REPLY = Reply("Every setting: its effective value and where it comes from", "Settings")


def _config() -> Config:
    return current_app.config["CLOUDTASK"]


def _file_values() -> dict[str, Any]:
    alerts = _config().alerts
    return {f.name: getattr(alerts, f.name) for f in fields(AlertsConfig)}


def _hook_key(hook: dict[str, Any]) -> str:
    return hook.get("url") or f"secret:{hook.get('url_secret')}"


def _shown(key: str, value: Any) -> Any:
    """A value as the API shows it: webhooks without their signing secret."""
    if key == "webhooks":
        hooks = []
        for hook in value or ():
            shown = {k: plain(v) for k, v in hook.items() if k != "secret"}
            shown["secret_set"] = bool(hook.get("secret"))
            hooks.append(shown)
        return hooks
    return plain(value)


def settings_json() -> dict[str, Any]:
    file = _file_values()
    stored = stored_settings(store())
    doc = store().read_settings_doc(SETTINGS_ID) or {}
    out: dict[str, Any] = {}
    for key in SETTING_KEYS:
        source = "database" if key in stored else "file"
        value = stored[key] if key in stored else file[key]
        if key == PASSWORD:  # write-only
            out[key] = {"set": bool(value), "source": source, "file_set": bool(file[key])}
        else:
            out[key] = {
                "value": _shown(key, value),
                "source": source,
                "file_value": _shown(key, file[key]),
            }
    return {
        "config_file": config_origin(_config()),
        "updated_at": jsonable(doc.get("updated_at")),
        "updated_by": doc.get("updated_by"),
        "settings": out,
    }


def _kept_hook_secrets(hooks: Any, current: Any) -> Any:
    """``hooks`` as given, each webhook without a signing secret (neither ``secret`` nor
    ``secret_secret``) given the current one of the webhook with the same URL, if any."""
    if not isinstance(hooks, list):
        return hooks  # the check says what is wrong with it
    secrets = {_hook_key(h): h["secret"] for h in current or () if h.get("secret")}
    out = []
    for hook in hooks:
        if (
            isinstance(hook, dict)
            and "secret" not in hook
            and "secret_secret" not in hook
            and _hook_key(hook) in secrets
        ):
            hook = {**hook, "secret": secrets[_hook_key(hook)]}
        out.append(hook)
    return out


def settings_to_store(changes: dict[str, Any], *, replace: bool) -> dict[str, Any]:
    """The settings to store after ``changes`` (``replace``: they are the whole set; else
    they change the stored set, ``null`` taking a key back to the file's value), the
    write-only secrets the body leaves out kept, the file's values left out."""
    problems: list[Problem] = []
    unknown_keys(changes, SETTING_KEYS, problems)
    if problems:
        raise ApiError(422, "the settings are invalid", problems)
    file = _file_values()
    stored = plain(stored_settings(store()))
    data = {} if replace else dict(stored)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    named = data.get("smtp_password_secret")
    if PASSWORD in changes:
        if changes[PASSWORD] is not None and named:
            problems.append(
                Problem(
                    PASSWORD,
                    "either give a password or name a stored secret (smtp_password_secret), "
                    "not both (the stored secret is kept encrypted: prefer it)",
                )
            )
    elif PASSWORD in stored:
        if named:
            data.pop(PASSWORD, None)  # a stored secret is named: the password stored here goes
        else:
            data[PASSWORD] = stored[PASSWORD]  # write-only: left out, it is kept
    if problems:
        raise ApiError(422, "the settings are invalid", problems)
    if "webhooks" in changes:
        current = stored.get("webhooks", plain(file["webhooks"]))
        data["webhooks"] = _kept_hook_secrets(changes["webhooks"], current)
    return follow_file(data, file)


def _save(data: dict[str, Any]) -> Any:
    prefix = _config().security.smtp_password_env_prefix
    try:
        before, after = ops().save_alert_settings(actor(), data, env_prefix=prefix)
    except ValidationError as e:
        raise ApiError(422, "the settings are invalid", e.problems) from None
    answer = settings_json()
    answer["changed"] = before != after
    return jsonify(answer)


@api.route(
    "GET",
    "/settings",
    summary="The alert settings",
    description="Each setting's effective value and its source (`database` or `file`, with "
    "the file's value). Secrets are never answered: the SMTP password is `set` or not, a "
    "webhook's signing secret `secret_set` or not.",
    replies={200: SETTINGS_REPLY},
)
@requires("admin")
def get_settings() -> Any:
    return jsonify(settings_json())


@api.route(
    "PATCH",
    "/settings",
    summary="Change some alert settings",
    description='`{"smtp_host": "mail.example.com", "operators": ["ops@example.com"], '
    '"alert_interval": "15m"}`: the keys given change, `null` takes one back to the config '
    "file's value. The SMTP password is write-only: left out it is kept, `null` removes the "
    "stored one. A webhook given without `secret` keeps the secret of the webhook with the "
    "same URL. Checked like the settings page (422 at the path of each problem; nothing is "
    "stored then) and audited.",
    body={JSON: ref("SettingsChange")},
    replies={200: SETTINGS_REPLY},
    errors=(422,),
)
@requires("admin")
def patch_settings() -> Any:
    return _save(settings_to_store(json_body(), replace=False))


@api.route(
    "PUT",
    "/settings",
    summary="Replace the stored alert settings",
    description="The body is the whole set stored in the database: a key left out follows "
    "the config file again (`{}` resets every one), except the write-only SMTP password, "
    "kept unless `smtp_password` is `null`. Webhook secrets as with PATCH.",
    body={JSON: ref("SettingsChange")},
    replies={200: SETTINGS_REPLY},
    errors=(422,),
)
@requires("admin")
def put_settings() -> Any:
    return _save(settings_to_store(json_body(), replace=True))


@api.route(
    "DELETE",
    "/settings/<key>",
    summary="Put one alert setting back to the config file's value",
    description="The stored value (the SMTP password too) is removed; the key follows the "
    "config file again.",
    params=(KEY_PARAM,),
    replies={200: SETTINGS_REPLY},
    errors=(404, 422),
)
@requires("admin")
def reset_setting(key: str) -> Any:
    if key not in SETTING_KEYS:
        raise ApiError(
            404, f"no setting named {key[:60]!r}; expected one of {', '.join(SETTING_KEYS)}"
        )
    return _save(settings_to_store({key: None}, replace=False))


@api.route(
    "POST",
    "/settings/test-mail",
    summary="Send a test mail",
    description='`{"to": "you@example.com"}`: sent now with the saved settings (as the '
    "settings page's button), audited either way. The answer says whether it was sent: "
    "`sent` false with the reason (the server refused, no host, a timeout) is the test's "
    "result, not an error of the request. It may take up to 30 s.",
    body={JSON: ref("TestMail")},
    replies={200: Reply("Whether it was sent, and what happened", "TestMailResult")},
    errors=(422,),
)
@requires("admin")
def test_mail() -> Any:
    body = json_body()
    problems: list[Problem] = []
    unknown_keys(body, ("to",), problems)
    to = body.get("to")
    if not isinstance(to, str) or not to.strip():
        problems.append(Problem("to", "required: the address to send the test mail to"))
    elif problem := email_problem(to.strip()):
        problems.append(Problem("to", problem))
    if problems:
        raise ApiError(422, "the test mail is invalid", problems)
    sent, message = send_test_mail_now(to.strip())
    return jsonify(sent=sent, to=to.strip(), message=message)
