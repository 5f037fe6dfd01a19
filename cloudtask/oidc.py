"""Login through an OpenID Connect provider (``auth.oidc``): the authorization code flow with
PKCE, with ``authlib`` (the request and the token exchange) and ``joserfc`` (the ID token's
signature).

:meth:`Provider.start` makes the provider's login URL with a new ``state``, ``nonce`` and PKCE
``code_verifier`` (S256), which the caller keeps (in the browser's session) for
:meth:`Provider.finish`. That one exchanges the code (with the verifier and the client's
secret) at the token endpoint and validates the ID token: signed by a key of the provider's
JWKS (read through discovery; read again once when the token names a key not yet known; never
``none`` nor a shared-secret algorithm), ``iss`` the configured issuer, ``aud`` the client id
(and ``azp`` when there are several audiences), not expired, issued not in the future, and
``nonce`` the one this login sent. The claims come from the ID token, and from the userinfo
endpoint when the groups or the name claim is not in it (its ``sub`` must be the token's).

The provider's metadata comes from ``<issuer>/.well-known/openid-configuration``; its
``issuer`` must be the configured one. It is kept for an hour (and read again at once after a
failure). A provider that cannot be reached, or answers what does not check out, raises
:class:`OidcError` with a message for the person logging in, an HTTP status for the page, and a
short ``reason`` for the audit log; nothing of it is a stack trace.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from typing import Any

from .authconfig import OidcSettings
from .exceptions import CloudTaskError, ConfigError

log = logging.getLogger(__name__)

METADATA_TTL = 3600.0
LEEWAY = 120  # seconds of clock difference allowed
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
ASYMMETRIC += ("EdDSA", "Ed25519")


class OidcError(CloudTaskError):
    """The login through the provider failed: ``status`` for the page, ``reason`` (a short
    code) for the audit log, the message for the person."""

    def __init__(self, message: str, status: int = 502, reason: str = "provider") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def _requirements() -> None:
    try:
        import authlib  # noqa: F401
        import joserfc  # noqa: F401
        import requests  # noqa: F401
    except ImportError:
        raise ConfigError(
            "auth.oidc needs the authlib and requests packages: pip install 'cloudtask[oidc]'"
        ) from None


class Provider:
    """One configured provider (``auth.oidc``); ``client_secret`` read from its reference."""

    def __init__(self, settings: OidcSettings, client_secret: str = "") -> None:
        _requirements()
        self.settings = settings
        self._secret = client_secret
        self._metadata: dict[str, Any] | None = None
        self._metadata_at = 0.0
        self._jwks: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the client secret
        return f"Provider(issuer={self.settings.issuer!r}, client_id={self.settings.client_id!r})"

    # --- the provider's documents ------------------------------------------------------------

    def _get_json(self, url: str, what: str) -> dict[str, Any]:
        import requests

        try:
            answer = requests.get(
                url, timeout=self.settings.timeout, headers={"Accept": "application/json"}
            )
        except requests.RequestException as e:
            log.warning("OpenID Connect: cannot read the %s at %s: %s", what, url, e)
            raise OidcError(
                f"{self.settings.name} cannot be reached right now (its {what} could not be "
                "read); try again later or log in with a CloudTask account",
                503,
                "provider unreachable",
            ) from None
        if answer.status_code != 200:
            log.warning("OpenID Connect: the %s at %s answered %s", what, url, answer.status_code)
            raise OidcError(
                f"{self.settings.name} answered {answer.status_code} for its {what}; try again "
                "later or ask an admin",
                503,
                "provider unreachable",
            )
        try:
            document = answer.json()
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise OidcError(f"{self.settings.name}'s {what} is not a JSON object", 502)
        return document

    def metadata(self, fresh: bool = False) -> dict[str, Any]:
        """The provider's discovery document (kept :data:`METADATA_TTL` seconds)."""
        with self._lock:
            now = time.monotonic()
            if not fresh and self._metadata and now - self._metadata_at < METADATA_TTL:
                return self._metadata
        issuer = self.settings.issuer
        document = self._get_json(
            issuer.rstrip("/") + "/.well-known/openid-configuration", "discovery document"
        )
        if document.get("issuer") != issuer:
            log.warning(
                "OpenID Connect: the discovery document names the issuer %r, not auth.oidc.issuer"
                " %r",
                document.get("issuer"),
                issuer,
            )
            raise OidcError(
                f"{self.settings.name} names another issuer than auth.oidc.issuer; ask an admin",
                502,
                "issuer mismatch",
            )
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(document.get(key), str) or not document[key].startswith(
                ("https://", "http://")
            ):
                raise OidcError(
                    f"{self.settings.name}'s discovery document has no usable {key}", 502
                )
        with self._lock:
            if self._metadata and self._metadata.get("jwks_uri") != document.get("jwks_uri"):
                self._jwks = None
            self._metadata, self._metadata_at = document, time.monotonic()
        return document

    def _key_set(self, fresh: bool = False) -> Any:
        from joserfc.jwk import KeySet

        with self._lock:
            jwks = self._jwks
        if jwks is None or fresh:
            jwks = self._get_json(self.metadata()["jwks_uri"], "signing keys (JWKS)")
            with self._lock:
                self._jwks = jwks
        try:
            return KeySet.import_key_set(jwks)  # type: ignore[arg-type]
        except Exception as e:
            raise OidcError(
                f"{self.settings.name}'s signing keys cannot be read: {e}", 502
            ) from None

    def _session(self, redirect_uri: str) -> Any:
        from authlib.integrations.requests_client import OAuth2Session

        s = self.settings
        return OAuth2Session(
            client_id=s.client_id,
            client_secret=self._secret or None,
            scope=" ".join(s.scopes),
            redirect_uri=redirect_uri,
            token_endpoint_auth_method=s.token_auth_method,
            code_challenge_method="S256",
        )

    # --- the flow ----------------------------------------------------------------------------

    def start(self, redirect_uri: str) -> tuple[str, dict[str, Any]]:
        """(the provider's login URL, what to keep for :meth:`finish`: ``state``, ``nonce``,
        ``code_verifier``, ``at``)."""
        endpoint = self.metadata()["authorization_endpoint"]
        pending = {
            "state": secrets.token_urlsafe(32),
            "nonce": secrets.token_urlsafe(32),
            "code_verifier": secrets.token_urlsafe(64),
            "at": time.time(),
        }
        with self._session(redirect_uri) as session:
            url, _ = session.create_authorization_url(
                endpoint,
                state=pending["state"],
                nonce=pending["nonce"],
                code_verifier=pending["code_verifier"],
            )
        return url, pending

    def finish(self, code: str, pending: dict[str, Any], redirect_uri: str) -> dict[str, Any]:
        """The user's claims, once the code is exchanged and the ID token checks out."""
        import requests
        from authlib.integrations.base_client.errors import OAuthError

        if not isinstance(code, str) or not code or len(code) > 4096:
            raise OidcError("the sign-in answer carries no code", 400, "no code")
        metadata = self.metadata()
        try:
            with self._session(redirect_uri) as session:
                token = session.fetch_token(
                    metadata["token_endpoint"],
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=pending.get("code_verifier"),
                    timeout=self.settings.timeout,
                )
        except OAuthError as e:
            log.warning("OpenID Connect: the token endpoint refused the code: %s", e.error)
            raise OidcError(
                f"{self.settings.name} refused to complete the login ({e.error}); start again",
                400,
                f"token refused: {e.error}",
            ) from None
        except requests.RequestException as e:
            log.warning("OpenID Connect: cannot reach the token endpoint: %s", e)
            raise OidcError(
                f"{self.settings.name} cannot be reached right now; try again later",
                503,
                "provider unreachable",
            ) from None
        except ValueError as e:  # an answer that is not a token
            raise OidcError(f"{self.settings.name} answered no token: {e}", 502) from None
        id_token = token.get("id_token") if isinstance(token, dict) else None
        if not isinstance(id_token, str):
            raise OidcError(f"{self.settings.name} answered no ID token", 502, "no id token")
        claims = self.validate_id_token(id_token, pending.get("nonce") or "")
        s = self.settings
        wanted = (s.groups_claim, s.username_claim)
        if any(claim(claims, c) is None for c in wanted) and metadata.get("userinfo_endpoint"):
            claims = {**self._userinfo(metadata["userinfo_endpoint"], token, claims), **claims}
        return claims

    def _userinfo(
        self, endpoint: str, token: dict[str, Any], claims: dict[str, Any]
    ) -> dict[str, Any]:
        import requests

        access = token.get("access_token")
        if not isinstance(access, str):
            return {}
        try:
            answer = requests.get(
                endpoint,
                headers={"Authorization": f"Bearer {access}"},
                timeout=self.settings.timeout,
            )
            info = answer.json() if answer.status_code == 200 else None
        except (requests.RequestException, ValueError) as e:
            log.warning("OpenID Connect: cannot read the userinfo endpoint: %s", e)
            return {}
        if not isinstance(info, dict) or info.get("sub") != claims.get("sub"):
            return {}  # another subject's claims are never mixed in
        return info

    def validate_id_token(
        self, id_token: str, nonce: str, now: float | None = None
    ) -> dict[str, Any]:
        """The ID token's claims if its signature, issuer, audience, times and nonce check out;
        else OidcError (400) saying which did not."""
        from joserfc import jwt
        from joserfc.errors import BadSignatureError, InvalidKeyIdError, JoseError

        metadata = self.metadata()
        offered = metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        algorithms = [a for a in offered if a in ASYMMETRIC] or ["RS256"]

        def bad(what: str) -> OidcError:
            log.warning("OpenID Connect: an ID token was refused: %s", what)
            return OidcError(
                f"the answer of {self.settings.name} did not check out ({what}); start again",
                400,
                f"id token: {what}",
            )

        try:
            try:
                decoded = jwt.decode(id_token, self._key_set(), algorithms=algorithms)
            except InvalidKeyIdError:  # the provider rotated its keys: read them again, once
                decoded = jwt.decode(id_token, self._key_set(fresh=True), algorithms=algorithms)
        except BadSignatureError:
            raise bad("bad signature") from None
        except (JoseError, ValueError) as e:
            raise bad(f"unreadable: {type(e).__name__}") from None
        claims = dict(decoded.claims)
        now = time.time() if now is None else now
        s = self.settings
        if claims.get("iss") != s.issuer:
            raise bad("issuer")
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        if s.client_id not in audiences:
            raise bad("audience")
        if len(audiences) > 1 and claims.get("azp") != s.client_id:
            raise bad("authorized party")
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, (int, float)) or exp + LEEWAY < now:
            raise bad("expired")
        if not isinstance(iat, (int, float)) or iat - LEEWAY > now:
            raise bad("issued in the future")
        sent = claims.get("nonce")
        if not isinstance(sent, str) or not nonce or not hmac.compare_digest(sent, nonce):
            raise bad("nonce")
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise bad("no subject")
        return claims


def claim(claims: dict[str, Any], name: str) -> Any:
    """A claim by name, or by a dotted path into nested objects (``realm_access.roles``)."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def claim_values(value: Any) -> list[str]:
    """A claim as a list of strings (a list of strings, or one string)."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v]
    return []
