"""The deny-list of networks (``security.egress_filter``): checked on the resolved address at
connect time, before anything is sent; off by default. Real sockets on loopback."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from cloudtask import netpolicy
from cloudtask.config import load_config
from cloudtask.exceptions import ConfigError
from cloudtask.netpolicy import (
    METADATA_NETWORKS,
    DeniedAddress,
    GuardedSMTP,
    GuardedSMTP_SSL,
    NetworkPolicy,
    url_handlers,
)

LOOPBACK = ["127.0.0.0/8", "::1/128"]


@contextlib.contextmanager
def listener() -> Iterator[tuple[socket.socket, int]]:
    """A TCP socket listening on 127.0.0.1: whether anything connected is ``accepted(sock)``."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.3)
    try:
        yield sock, sock.getsockname()[1]
    finally:
        sock.close()


def accepted(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except TimeoutError:
        return False
    conn.close()
    return True


def test_off_by_default_and_the_metadata_addresses_are_on_the_list_when_on():
    cfg = load_config(None, environ={})
    policy = NetworkPolicy.from_config(cfg)
    assert not policy.enabled and policy.denied_by("169.254.169.254") is None
    on = NetworkPolicy.from_config(
        load_config(None, environ={"CLOUDTASK_SECURITY_EGRESS_FILTER": "true"})
    )
    assert {"169.254.169.254/32", "fd00:ec2::254/128"} <= set(METADATA_NETWORKS)
    assert str(on.denied_by("169.254.169.254")) == "169.254.169.254/32"
    assert str(on.denied_by("fd00:ec2::254")) == "fd00:ec2::254/128"
    assert str(on.denied_by("::ffff:169.254.169.254")) == "169.254.169.254/32"  # mapped
    assert on.denied_by("fe80::1%eth0") is None and on.denied_by("10.1.2.3") is None
    more = NetworkPolicy(True, ["10.0.0.0/8", "192.168.1.7"])
    assert str(more.denied_by("10.1.2.3")) == "10.0.0.0/8"
    assert str(more.denied_by("192.168.1.7")) == "192.168.1.7/32"
    assert more.denied_by("192.168.1.8") is None


def test_the_config_keys(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps({"security": {"egress_filter": True, "egress_deny": ["10.0.0.0/8", "::1"]}})
    )
    cfg = load_config(str(path), environ={})
    assert cfg.security.egress_filter is True
    assert cfg.security.egress_deny == ("10.0.0.0/8", "::1/128")
    env = {"CLOUDTASK_SECURITY_EGRESS_DENY": "10.0.0.0/8, 172.16.0.0/12"}
    assert load_config(None, environ=env).security.egress_deny == ("10.0.0.0/8", "172.16.0.0/12")
    path.write_text(json.dumps({"security": {"egress_deny": ["10.0.0.0/33"]}}))
    with pytest.raises(ConfigError, match="security.egress_deny: '10.0.0.0/33' is not a network"):
        load_config(str(path), environ={})
    path.write_text(json.dumps({"security": {"egress_filter": "maybe"}}))
    with pytest.raises(ConfigError, match="security.egress_filter: expected true or false"):
        load_config(str(path), environ={})


def test_a_denied_address_is_refused_before_connecting_and_others_connect():
    with listener() as (sock, port):
        policy = NetworkPolicy(True, LOOPBACK)
        with pytest.raises(DeniedAddress) as e:
            policy.create_connection(("127.0.0.1", port), 2)
        assert str(e.value) == (
            "connecting to 127.0.0.1 is refused: 127.0.0.0/8 is on the deny-list of networks "
            "(security.egress_filter)"
        )
        assert isinstance(e.value, OSError)
        assert not accepted(sock)  # nothing reached the listener
        # a name is checked on what it resolves to
        with pytest.raises(DeniedAddress, match=r"connecting to localhost \(127.0.0.1\)"):
            policy.create_connection(("localhost", port), 2)
        assert not accepted(sock)
        # the metadata list alone lets loopback through; so does the policy when off
        for allowed in (NetworkPolicy(True), NetworkPolicy()):
            allowed.create_connection(("127.0.0.1", port), 2).close()
            assert accepted(sock)


def test_urllib_handlers_keep_to_the_policy_for_http_and_https():
    with listener() as (sock, port):
        policy = NetworkPolicy(True, LOOPBACK)
        opener = urllib.request.build_opener(*url_handlers(policy))
        for scheme in ("http", "https"):
            with pytest.raises(urllib.error.URLError) as e:
                opener.open(f"{scheme}://127.0.0.1:{port}/x", timeout=2)
            assert isinstance(e.value.reason, DeniedAddress)
        assert not accepted(sock)  # no TLS handshake either
        # a policy-less opener follows the process's policy, as the agent sets it
        follows = urllib.request.build_opener(*url_handlers())
        try:
            netpolicy.configure(policy)
            with pytest.raises(urllib.error.URLError, match="deny-list"):
                follows.open(f"http://localhost:{port}/", timeout=2)
            assert not accepted(sock)
        finally:
            netpolicy.configure(NetworkPolicy())
        with pytest.raises(OSError):  # allowed now: it connects (the listener never answers)
            follows.open(f"http://127.0.0.1:{port}/", timeout=0.5)
        assert accepted(sock)


def test_metadata_urls_are_refused_at_once():
    opener = urllib.request.build_opener(*url_handlers(NetworkPolicy(True)))
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/latest/"):
        with pytest.raises(urllib.error.URLError) as e:
            opener.open(url, timeout=5)
        assert "is on the deny-list of networks" in str(e.value.reason)


@pytest.mark.parametrize("cls", [GuardedSMTP, GuardedSMTP_SSL])
def test_smtp_clients_keep_to_the_policy(cls):
    with listener() as (sock, port):
        kwargs = {"context": ssl.create_default_context()} if cls is GuardedSMTP_SSL else {}
        with pytest.raises(DeniedAddress):
            cls("127.0.0.1", port, timeout=2, policy=NetworkPolicy(True, LOOPBACK), **kwargs)
        assert not accepted(sock)
