"""Where CloudTask may connect on behalf of people: an optional deny-list of networks for
webhooks, SMTP servers and HTTP tasks.

Off by default. With ``security.egress_filter`` on, a connection to an address in
:data:`METADATA_NETWORKS` (the cloud metadata services, which hand out the machine's
credentials) or in ``security.egress_deny`` is refused. The check is made on the *resolved*
address, at connect time, for every address a name resolves to (IPv4-mapped IPv6 addresses
are checked as the IPv4 address they carry): a name that resolves to a denied address is
refused as the address itself would be, and a name that resolves to it only later (DNS
rebinding) is caught then, since the socket connects to the very address that was checked.

:meth:`NetworkPolicy.create_connection` is a drop-in for ``socket.create_connection``;
:func:`url_handlers` gives urllib handlers whose connections use it, and :class:`GuardedSMTP`
/ :class:`GuardedSMTP_SSL` are smtplib's clients with it. A refusal is a
:class:`DeniedAddress`, an ``OSError``, so code that reports "cannot reach" reports it too.

A process (the agent, for its HTTP tasks) sets its policy once with :func:`configure`;
:func:`url_handlers` without a policy follows the process's policy at each connection::

    netpolicy.configure(NetworkPolicy.from_config(cfg))
    opener = urllib.request.build_opener(*netpolicy.url_handlers())
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import smtplib
import socket
import urllib.request
from collections.abc import Iterable
from typing import Any

# the cloud metadata services: AWS, GCP, Azure, OpenStack, DigitalOcean ... (169.254.169.254),
# AWS over IPv6 (fd00:ec2::254), the AWS ECS task credentials endpoint (169.254.170.2) and
# Alibaba Cloud (100.100.100.200)
METADATA_NETWORKS = (
    "169.254.169.254/32",
    "fd00:ec2::254/128",
    "169.254.170.2/32",
    "100.100.100.200/32",
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """Networks from ``"10.0.0.0/8"``, ``"fd00::/8"`` or plain addresses; ValueError naming the
    first bad one."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"{value!r} is not a network such as '10.0.0.0/8', 'fd00::/8' or an address"
            ) from None
    return tuple(out)


def check_networks(v: Any) -> tuple[str, ...]:
    """The config check of ``security.egress_deny``: a list of networks or addresses (from the
    environment also JSON, or "a, b"), each written back in its canonical form."""
    import json

    if isinstance(v, str):
        text = v.strip()
        if text.startswith("["):
            try:
                v = json.loads(text)
            except ValueError as e:
                raise ValueError(f"expected a list of networks as JSON: {e}") from None
        else:
            v = [p.strip() for p in text.split(",") if p.strip()]
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise ValueError(
            f'expected a list of networks such as ["10.0.0.0/8", "fd00::/8"], got {v!r}'
        )
    return tuple(str(n) for n in parse_networks(v))


class DeniedAddress(OSError):
    """A connection refused by the network policy (before anything was sent)."""


class NetworkPolicy:
    """Which addresses may not be connected to. ``NetworkPolicy()`` allows everything."""

    def __init__(self, enabled: bool = False, deny: Iterable[str] = ()) -> None:
        self.enabled = enabled
        self.networks: tuple[Network, ...] = (
            parse_networks((*METADATA_NETWORKS, *deny)) if enabled else ()
        )

    @classmethod
    def from_config(cls, cfg: Any) -> NetworkPolicy:
        """The policy of ``cfg.security`` (``egress_filter``, ``egress_deny``)."""
        return cls(cfg.security.egress_filter, cfg.security.egress_deny)

    def __repr__(self) -> str:
        if not self.enabled:
            return "NetworkPolicy(off)"
        return f"NetworkPolicy(deny={[str(n) for n in self.networks]})"

    def denied_by(self, address: str) -> Network | None:
        """The denied network ``address`` (an IP address, with an IPv6 zone or not) is in."""
        if not self.enabled:
            return None
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        for candidate in candidates:
            for network in self.networks:
                if candidate.version == network.version and candidate in network:
                    return network
        return None

    def check(self, host: str, address: str) -> None:
        """Raise :class:`DeniedAddress` when ``address`` (what ``host`` resolved to) is denied."""
        network = self.denied_by(address)
        if network is not None:
            shown = host if host == address else f"{host} ({address})"
            raise DeniedAddress(
                f"connecting to {shown} is refused: {network} is on the deny-list of networks "
                "(security.egress_filter)"
            )

    def create_connection(
        self,
        address: tuple[str, int],
        timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
        source_address: tuple[str, int] | None = None,
        **options: Any,
    ) -> socket.socket:
        """``socket.create_connection``, refusing denied addresses: every address the host
        resolves to is tried in turn, as there, except the denied ones; when every one is
        denied, :class:`DeniedAddress` names the first."""
        if not self.enabled:
            return socket.create_connection(address, timeout, source_address, **options)
        host, port = address[0], address[1]
        denied: DeniedAddress | None = None
        error: OSError | None = None
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(
            host, port, 0, socket.SOCK_STREAM
        ):
            try:
                self.check(host, sockaddr[0])
            except DeniedAddress as e:
                denied = denied or e
                continue
            sock = None
            try:
                sock = socket.socket(family, kind, proto)
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                error = e
                if sock is not None:
                    sock.close()
        if error is not None:
            raise error
        if denied is not None:
            raise denied
        raise OSError(f"getaddrinfo returned no address for {host}")


# --- the process's policy ------------------------------------------------------------------------

_current = NetworkPolicy()


def configure(policy: NetworkPolicy) -> None:
    """Set the policy of this process (the agent's HTTP tasks follow it)."""
    global _current
    _current = policy


def current() -> NetworkPolicy:
    return _current


def create_connection(*args: Any, policy: NetworkPolicy | None = None, **kwargs: Any) -> Any:
    """``socket.create_connection`` under ``policy``, or the process's policy."""
    return (policy or _current).create_connection(*args, **kwargs)


# --- urllib ---------------------------------------------------------------------------------------


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, policy: NetworkPolicy | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(create_connection, policy=policy)


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, policy: NetworkPolicy | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(create_connection, policy=policy)


class GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: NetworkPolicy | None = None, debuglevel: int = 0) -> None:
        super().__init__(debuglevel)
        self.policy = policy

    def http_open(self, req: Any) -> Any:
        return self.do_open(functools.partial(_GuardedHTTPConnection, policy=self.policy), req)


class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: NetworkPolicy | None = None, context: Any = None) -> None:
        super().__init__(context=context)
        self.policy = policy

    def https_open(self, req: Any) -> Any:
        connection = functools.partial(_GuardedHTTPSConnection, policy=self.policy)
        return self.do_open(connection, req, context=self._context)


def url_handlers(policy: NetworkPolicy | None = None) -> tuple[urllib.request.BaseHandler, ...]:
    """urllib handlers (``build_opener(..., *url_handlers())``) for http and https whose
    connections keep to ``policy`` (None: the process's policy at each connection)."""
    return (GuardedHTTPHandler(policy), GuardedHTTPSHandler(policy))


# --- smtplib --------------------------------------------------------------------------------------


class GuardedSMTP(smtplib.SMTP):
    """``smtplib.SMTP`` whose connection keeps to ``policy`` (None: the process's)."""

    def __init__(self, *args: Any, policy: NetworkPolicy | None = None, **kwargs: Any) -> None:
        self._policy = policy
        super().__init__(*args, **kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        if timeout is not None and not timeout:
            raise ValueError("Non-blocking socket (timeout=0) is not supported")
        return create_connection((host, port), timeout, self.source_address, policy=self._policy)


class GuardedSMTP_SSL(smtplib.SMTP_SSL, GuardedSMTP):  # noqa: N801 (smtplib's name)
    """``smtplib.SMTP_SSL`` whose connection keeps to ``policy`` (TLS over the checked socket)."""

    def __init__(self, *args: Any, policy: NetworkPolicy | None = None, **kwargs: Any) -> None:
        self._policy = policy
        smtplib.SMTP_SSL.__init__(self, *args, **kwargs)
