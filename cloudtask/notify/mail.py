"""Mail through smtplib: one connection per notifier pass, one message per recipient.

One message per recipient (not one message to many): each recipient is a delivery of its own
(``<event>:mail:<address>``), so a refused address fails alone and is retried alone, a crash
repeats at most one recipient's copy, and a delivery's "sent" is true of exactly one mailbox.

Every network call has the configured timeout (``alerts.smtp_timeout``). Errors are
:class:`DeliveryError` with a message fit for the delivery's ``last_error``; ``whole_target``
says the server itself failed (connection, TLS, login), so the other mail of the pass waits.
"""

from __future__ import annotations

import hashlib
import smtplib
import socket
import ssl
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from functools import lru_cache
from typing import Any

from ..clock import utcnow
from ..config import email_problem
from ..exceptions import CloudTaskError
from ..netpolicy import DeniedAddress, GuardedSMTP, GuardedSMTP_SSL
from .content import one_line, test_body
from .settings import AlertSettings

# Header lines up to RFC 5322's hard limit (998), not its 78-character advice: an ASCII
# subject of up to 250 characters stays on one line. Folded, it came out of readers that do
# not unfold (and of Python's own compat32 parsing) with a line break and a leading space.
UNFOLDED = policy.default.clone(max_line_length=998)


class DeliveryError(CloudTaskError):
    """A send failed. ``whole_target``: the server or receiver failed, not just this message."""

    def __init__(self, message: str, *, whole_target: bool = True) -> None:
        super().__init__(message)
        self.whole_target = whole_target


@lru_cache(maxsize=1)
def local_hostname() -> str:
    """This host's name for EHLO, looked up once (socket.getfqdn may wait on DNS)."""
    return socket.getfqdn() or "localhost"


def envelope_sender(settings: AlertSettings) -> str:
    return parseaddr(settings.sender)[1]


def message_id(delivery_id: str, sender: str) -> str:
    """The same Message-ID on every attempt of a delivery: a repeated send is a duplicate a
    mail client can recognise."""
    domain = sender.rpartition("@")[2] or "cloudtask.localdomain"
    return f"<{hashlib.sha256(delivery_id.encode()).hexdigest()[:32]}@{domain}>"


def build_message(
    *,
    settings: AlertSettings,
    to: str,
    subject: str,
    body: str,
    delivery_id: str,
    kind: str,
    date: Any,
) -> EmailMessage:
    subject = one_line(subject, 250)
    # an ASCII subject on one line; one with other characters is made of RFC 2047 encoded
    # words, at most 75 characters each, folded between them (decoders join those right)
    msg = EmailMessage(policy=UNFOLDED if subject.isascii() else policy.default)
    msg["From"] = settings.sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(date)
    msg["Message-ID"] = message_id(delivery_id, envelope_sender(settings))
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to alerts
    msg["X-CloudTask-Event"] = kind
    msg.set_content(body, charset="utf-8")
    return msg


class SmtpConnection:
    """An SMTP session opened on first use: security, login, then any number of messages."""

    def __init__(self, settings: AlertSettings) -> None:
        self.settings = settings
        self._smtp: smtplib.SMTP | None = None

    @property
    def where(self) -> str:
        return f"{self.settings.smtp_host}:{self.settings.smtp_port}"

    def open(self) -> None:
        s = self.settings
        if not s.mail_enabled:
            raise DeliveryError("mail is off: alerts.smtp_host is empty")
        try:
            # the host is given to the constructor: TLS checks the certificate against it
            # (connected under the network policy: a denied address is refused unsent)
            if s.smtp_security == "ssl":
                smtp: smtplib.SMTP = GuardedSMTP_SSL(
                    s.smtp_host,
                    s.smtp_port,
                    timeout=s.smtp_timeout,
                    local_hostname=local_hostname(),
                    context=ssl.create_default_context(),
                    policy=s.egress,
                )
            else:
                smtp = GuardedSMTP(
                    s.smtp_host,
                    s.smtp_port,
                    timeout=s.smtp_timeout,
                    local_hostname=local_hostname(),
                    policy=s.egress,
                )
            self._smtp = smtp
            smtp.ehlo()
            if s.smtp_security == "starttls":
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if s.smtp_user:
                if s.password_problem:
                    raise DeliveryError(s.password_problem)
                smtp.login(s.smtp_user, s.smtp_password)
        except DeliveryError:
            self.close()
            raise
        except Exception as e:
            self.close()
            raise DeliveryError(self._explain(e)) from None

    def _explain(self, e: BaseException) -> str:
        s, where = self.settings, self.where
        if isinstance(e, (TimeoutError, socket.timeout)):
            return f"the SMTP server {where} did not answer within {s.smtp_timeout:g}s"
        if isinstance(e, ssl.SSLError):
            hint = (
                "is it a TLS port (usually 465)? For STARTTLS (port 587) set "
                'alerts.smtp_security to "starttls"'
                if s.smtp_security == "ssl"
                else "check the server's certificate"
            )
            reason = getattr(e, "reason", None) or e
            return (
                f"TLS with the SMTP server {where} failed ({reason}; "
                f'alerts.smtp_security is "{s.smtp_security}"): {hint}'
            )
        if isinstance(e, smtplib.SMTPNotSupportedError):
            if "STARTTLS" in str(e):
                return (
                    f"the SMTP server {where} does not offer STARTTLS "
                    '(alerts.smtp_security is "starttls"): use "ssl" for a TLS port, or '
                    '"none" for a server without TLS'
                )
            return f"the SMTP server {where} does not offer a login (alerts.smtp_user is set)"
        if isinstance(e, smtplib.SMTPAuthenticationError):
            return (
                f"the SMTP server {where} refused the login of {s.smtp_user!r}: "
                f"{e.smtp_code} {_text(e.smtp_error)}"
            )
        if isinstance(e, smtplib.SMTPResponseException):
            return f"the SMTP server {where} answered {e.smtp_code} {_text(e.smtp_error)}"
        if isinstance(e, ConnectionRefusedError):
            return f"cannot connect to the SMTP server {where}: connection refused"
        if isinstance(e, DeniedAddress):
            return f"the SMTP server {where} is not used: {e}"
        if isinstance(e, smtplib.SMTPServerDisconnected):
            return f"the SMTP server {where} closed the connection ({e})"
        if isinstance(e, OSError):
            return f"cannot connect to the SMTP server {where}: {e.strerror or e}"
        return f"the SMTP server {where} failed: {type(e).__name__}: {e}"

    def send(self, msg: EmailMessage, to: str) -> None:
        """Send one message to one recipient (the session is opened on first use)."""
        if problem := email_problem(to):
            raise DeliveryError(f"not sent: {problem}", whole_target=False)
        if self._smtp is None:
            self.open()
        assert self._smtp is not None
        try:
            self._smtp.send_message(msg, from_addr=envelope_sender(self.settings), to_addrs=[to])
        except smtplib.SMTPRecipientsRefused as e:
            code, text = next(iter(e.recipients.values()), (0, b""))
            raise DeliveryError(
                f"the SMTP server {self.where} refused the recipient {to}: {code} {_text(text)}",
                whole_target=False,
            ) from None
        except smtplib.SMTPDataError as e:
            raise DeliveryError(
                f"the SMTP server {self.where} refused the message: "
                f"{e.smtp_code} {_text(e.smtp_error)}",
                whole_target=e.smtp_code < 500,
            ) from None
        except Exception as e:
            self.close()
            raise DeliveryError(self._explain(e)) from None

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except Exception:
            try:
                smtp.close()
            except Exception:
                pass


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return one_line(value, 300)


def send_test_mail(settings: AlertSettings, to: str, *, check_only: bool = False) -> None:
    """Send a test mail to ``to`` now (the settings page). Raises CloudTaskError saying what
    failed: mail off, a bad address, no connection, TLS, the login, a refused recipient.
    ``check_only``: only the checks made before connecting (mail off, a bad address)."""
    if problem := email_problem(to):
        raise CloudTaskError(f"cannot send a test mail: {problem}")
    if not settings.mail_enabled:
        raise CloudTaskError("cannot send a test mail: mail is off (alerts.smtp_host is empty)")
    if check_only:
        return
    now = utcnow()
    msg = build_message(
        settings=settings,
        to=to,
        subject=f"[CloudTask] TEST mail from {settings.base_url}",
        body=test_body(settings.base_url, settings.sender),
        delivery_id=f"test:{to}:{now.timestamp()}",
        kind="test",
        date=now,
    )
    conn = SmtpConnection(settings)
    try:
        conn.send(msg, to)
    except DeliveryError as e:
        raise CloudTaskError(f"the test mail was not sent: {e}") from None
    finally:
        conn.close()
