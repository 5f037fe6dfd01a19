"""Webhooks: a JSON POST per event, signed with the webhook's shared secret.

Headers: ``X-CloudTask-Signature: sha256=<hex HMAC-SHA256 of the exact body>``,
``X-CloudTask-Event: <kind>``, ``X-CloudTask-Delivery: <delivery id>`` (the same on every
retry, so a receiver can drop a repeat). A receiver checks the signature like this::

    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    hmac.compare_digest(expected, request.headers["X-CloudTask-Signature"])

Any 2xx answer is success. Redirects are not followed (the signed body is for this URL). The
connection keeps to the network policy (``security.egress_filter``): a URL whose host resolves
to a denied address is not posted to.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import time
import urllib.error
import urllib.request

from ..netpolicy import DeniedAddress, NetworkPolicy, url_handlers
from .content import one_line
from .mail import DeliveryError

MAX_ANSWER_BYTES = 64 * 1024  # what is read of an answer (it is not used)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        return None


def _opener(policy: NetworkPolicy | None) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_NoRedirects, *url_handlers(policy))


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def post_event(
    url: str,
    body: bytes,
    *,
    secret: str,
    kind: str,
    delivery_id: str,
    timeout: float,
    policy: NetworkPolicy | None = None,
    name: str | None = None,
) -> int:
    """POST ``body`` to ``url``; returns the HTTP status, or raises DeliveryError.

    ``timeout`` bounds the connection and each read, and the whole answer is read within it.
    ``policy``: the network policy of the connection (None: the process's). ``name``: how
    errors name the webhook (default: its URL; ``secret:NAME`` for a URL that is a secret).
    """
    shown = name or url
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "cloudtask-notifier",
        "X-CloudTask-Event": kind,
        "X-CloudTask-Delivery": delivery_id,
        "X-CloudTask-Signature": signature(secret, body),
    }
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    deadline = time.monotonic() + timeout
    try:
        with _opener(policy).open(request, timeout=timeout) as response:
            status = response.status
            left = MAX_ANSWER_BYTES
            while left > 0 and time.monotonic() < deadline:
                chunk = response.read(min(left, 16384))
                if not chunk:
                    break
                left -= len(chunk)
    except urllib.error.HTTPError as e:
        with e:
            status = e.code
            reason = one_line(e.reason, 100)
        # 4xx (but 408 and 429) is about this request; the rest is the receiver's trouble
        whole = status >= 500 or status in (408, 429) or status < 400
        raise DeliveryError(
            f"{shown} answered HTTP {status} {reason}", whole_target=whole
        ) from None
    except (TimeoutError, OSError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise DeliveryError(f"{shown} did not answer within {timeout:g}s") from None
        if isinstance(reason, ConnectionRefusedError):
            raise DeliveryError(f"cannot connect to {shown}: connection refused") from None
        if isinstance(reason, DeniedAddress):
            raise DeliveryError(f"not posted to {shown}: {reason}") from None
        text = getattr(reason, "strerror", None) or reason
        raise DeliveryError(f"cannot reach {shown}: {one_line(text, 200)}") from None
    except http.client.HTTPException as e:  # a broken answer
        raise DeliveryError(f"{shown} gave no proper HTTP answer ({type(e).__name__})") from None
    except ValueError as e:  # http.client refuses some URLs only when asked to open them
        why = str(e) if shown == url else "the URL is not usable"  # e may quote the URL
        raise DeliveryError(f"cannot post to {shown}: {why}", whole_target=False) from None
    if not 200 <= status < 300:
        raise DeliveryError(f"{shown} answered HTTP {status} (expected 2xx)")
    return status
