"""Secret values encrypted at rest: AES-256-GCM under a key ring read from a file or the
environment.

``secrets.keys`` (or ``CLOUDTASK_SECRETS_KEYS``) names the key ring, one of two ways, so no
key stands in the JSON config in clear:

* ``"file:/path/to/keys"``: the file holds the ring (keep it mode 0600, readable by the
  CloudTask user only; ``cloudtask up`` makes one in its data folder);
* ``"env:VARIABLE"``: the environment variable holds it.

A ring is one or more keys, one a line (or separated by commas): ``<id>:<base64 of 32
bytes>``. The **first** is the primary: every value is encrypted under it. The others only
decrypt values written under them. Rotation: put a new key first (``cloudtask secrets
new-key`` prints one), restart the processes, run ``cloudtask secrets rotate`` (every value
is encrypted again under the primary), then drop the old key from the ring.

Each value is sealed with a fresh 96-bit nonce and the secret's name as associated data, so
a stored ciphertext cannot be moved to another name. The key id is stored beside it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .authconfig import read_secret
from .exceptions import CloudTaskError, ConfigError

FORMS = "'file:/path/to/keys' or 'env:VARIABLE'"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,40}")


class SecretError(CloudTaskError):
    """A value cannot be sealed or opened: no key ring, an unknown key, a damaged value."""


def check_setting(v: Any) -> str:
    """The config check of ``secrets.keys`` (the value itself is never shown)."""
    if not isinstance(v, str):
        raise ValueError(f"expected a string: {FORMS}")
    if not v:
        return v
    kind, _, rest = v.partition(":")
    if kind == "env" and _ENV_NAME.fullmatch(rest):
        return v
    if kind == "file" and rest.strip():
        return v
    raise ValueError(f"expected {FORMS} (the keys themselves never stand in the config)")


def new_key(key_id: str | None = None) -> str:
    """A new ring line: ``<id>:<base64 of 32 random bytes>``."""
    key_id = key_id or f"k{secrets.token_hex(4)}"
    if not _KEY_ID.fullmatch(key_id):
        raise ValueError("a key id is 1 to 40 letters, digits, '.', '_' or '-'")
    return f"{key_id}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"


def parse_ring(text: str, where: str) -> list[tuple[str, bytes]]:
    """The keys of a ring's text, primary first; ConfigError saying which line is wrong."""
    keys: list[tuple[str, bytes]] = []
    lines = [p.strip() for p in re.split(r"[,\n]", text) if p.strip() and not p.startswith("#")]
    for n, line in enumerate(lines, 1):
        key_id, sep, encoded = line.partition(":")
        problem = None
        if not sep or not _KEY_ID.fullmatch(key_id):
            problem = "expected <id>:<base64 key>, the id 1 to 40 letters, digits, '.', '_', '-'"
        else:
            try:
                raw = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            if len(raw) != 32:
                problem = (
                    "the key is not the base64 of 32 bytes (make one: cloudtask secrets new-key)"
                )
        if problem:
            raise ConfigError(f"secrets.keys: {where}, key {n}: {problem}")
        if any(k == key_id for k, _ in keys):
            raise ConfigError(f"secrets.keys: {where}, key {n}: the id {key_id!r} is used twice")
        keys.append((key_id, raw))
    if not keys:
        raise ConfigError(f"secrets.keys: {where} holds no key")
    return keys


@dataclass(frozen=True)
class SecretBox:
    """Seals and opens values under a key ring (see the module's docstring)."""

    keys: tuple[tuple[str, bytes], ...]

    def __repr__(self) -> str:  # never a key in a log or a traceback
        return f"SecretBox(keys={[k for k, _ in self.keys]!r})"

    @property
    def primary(self) -> str:
        return self.keys[0][0]

    def seal(self, name: str, value: str) -> dict[str, Any]:
        """What is stored for ``value``: the key id, the nonce and the ciphertext."""
        key_id, key = self.keys[0]
        nonce = os.urandom(12)
        sealed = AESGCM(key).encrypt(nonce, value.encode("utf-8"), name.encode("utf-8"))
        return {"key_id": key_id, "nonce": nonce, "ciphertext": sealed}

    def open(self, name: str, stored: Mapping[str, Any]) -> str:
        """The value ``seal`` stored for ``name``; SecretError if it cannot be opened."""
        key = dict(self.keys).get(stored.get("key_id", ""))
        if key is None:
            raise SecretError(
                f"secret {name!r} is sealed under key {stored.get('key_id')!r}, which is not "
                "in this process's key ring (secrets.keys)"
            )
        try:
            plain = AESGCM(key).decrypt(
                bytes(stored["nonce"]), bytes(stored["ciphertext"]), name.encode("utf-8")
            )
        except (InvalidTag, KeyError, TypeError, ValueError):
            raise SecretError(f"secret {name!r} cannot be opened: damaged or not its own") from None
        return plain.decode("utf-8")


def load_box(setting: str, environ: Mapping[str, str] | None = None) -> SecretBox | None:
    """The key ring ``secrets.keys`` names, or None when it is empty (no secrets here)."""
    if not setting:
        return None
    text = read_secret(setting, "secrets.keys", environ)
    kind, _, rest = setting.partition(":")
    where = f"the environment variable {rest}" if kind == "env" else rest
    return SecretBox(tuple(parse_ring(text, where)))


def make_key_file(path: Path) -> None:
    """A new ring of one key at ``path``, mode 0600 from its first byte (``cloudtask up``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(new_key("k1") + "\n")
