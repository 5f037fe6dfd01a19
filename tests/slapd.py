"""A real OpenLDAP server (Debian's ``slapd``) for the tests, started in a folder of the
test's own: ``slapd.conf`` written there, an mdb database there, loopback ports only (plain
LDAP with StartTLS on one, LDAPS on another), a certificate made by a test CA of its own.

Entries are loaded and changed with OpenLDAP's own clients (``ldapadd``, ``ldapmodify``,
``ldapdelete``) as the directory's administrator, as an operator of a directory would.

``make test`` installs the packages (``slapd``, ``ldap-utils``: scripts/ensure-ldap.sh);
without them :data:`MISSING` says why the LDAP tests are skipped.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from cloudtask.localservers import free_port

SUFFIX = "dc=example,dc=org"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "directory admin secret"
SERVICE_DN = f"cn=cloudtask,ou=services,{SUFFIX}"
SERVICE_PASSWORD = "service account secret"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
SCHEMAS = ("core", "cosine", "inetorgperson", "nis")


def _find(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )


SLAPD = _find("slapd")
LDAPADD = _find("ldapadd")
MISSING = None
if SLAPD is None or LDAPADD is None:
    MISSING = (
        "Debian's slapd and ldap-utils are not installed (make test installs them: "
        "scripts/ensure-ldap.sh)"
    )
elif not Path("/etc/ldap/schema/core.schema").exists():
    MISSING = "slapd is installed without its schema files (/etc/ldap/schema)"


def person(uid: str, password: str, **more: str) -> str:
    lines = [
        f"dn: uid={uid},{PEOPLE}",
        "objectClass: inetOrgPerson",
        f"uid: {uid}",
        f"cn: {uid.title()}",
        f"sn: {uid.title()}",
        f"userPassword: {password}",
    ]
    lines += [f"{k}: {v}" for k, v in more.items()]
    return "\n".join(lines) + "\n"


def group(name: str, *members: str) -> str:
    lines = [f"dn: cn={name},{GROUPS}", "objectClass: groupOfNames", f"cn: {name}"]
    # groupOfNames needs a member: the administrator stays in every group
    lines += [f"member: {ROOT_DN}"] + [f"member: uid={m},{PEOPLE}" for m in members]
    return "\n".join(lines) + "\n"


BASE_LDIF = f"""dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: ou=people,{SUFFIX}
objectClass: organizationalUnit
ou: people

dn: ou=groups,{SUFFIX}
objectClass: organizationalUnit
ou: groups

dn: ou=services,{SUFFIX}
objectClass: organizationalUnit
ou: services

dn: {SERVICE_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: cloudtask
userPassword: {SERVICE_PASSWORD}
"""


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1 and localhost signed by it: (the CA's
    certificate, the server's certificate, the server's key), PEM files in ``folder``."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CloudTask test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "server.pem", folder / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


class Slapd:
    """slapd in ``folder``: ``url`` (ldap://, StartTLS offered), ``ldaps_url``, ``ca_file``
    (the CA that signed its certificate)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.port = free_port()
        self.ldaps_port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.ldaps_url = f"ldaps://localhost:{self.ldaps_port}"
        self.log_path = self.folder / "slapd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.ca_file = ""

    def start(self, ldif: str = "", memberof: bool = False) -> Slapd:
        """Start it with the base entries and ``ldif``; ``memberof``: the memberof overlay
        keeps ``memberOf`` on each member's entry (as directories often do)."""
        assert SLAPD is not None, MISSING
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        ca, cert, key = make_certificates(self.folder)
        self.ca_file = str(ca)
        includes = "\n".join(f"include /etc/ldap/schema/{s}.schema" for s in SCHEMAS)
        conf = self.folder / "slapd.conf"
        conf.write_text(
            f"""{includes}
modulepath /usr/lib/ldap
moduleload back_mdb
{"moduleload memberof" if memberof else ""}
pidfile {self.folder}/slapd.pid
TLSCACertificateFile {ca}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
database mdb
maxsize 16777216
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw "{ROOT_PASSWORD}"
directory {data}
{"overlay memberof" if memberof else ""}
access to attrs=userPassword by self =xw by anonymous auth by * none
access to * by dn.exact="{SERVICE_DN}" read by users read by * none
"""
        )
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    SLAPD,
                    "-f",
                    str(conf),
                    "-h",
                    f"{self.url}/ ldaps://127.0.0.1:{self.ldaps_port}/",
                    "-d",
                    "0",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"slapd exited at start: {self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"slapd did not answer: {self.log_tail()}") from None
                time.sleep(0.05)
        self.add(BASE_LDIF + ("\n" + ldif if ldif else ""))
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _client(self, tool: str, *args: str, ldif: str | None = None) -> None:
        path = _find(tool)
        assert path is not None, f"{tool} is not installed"
        answer = subprocess.run(
            [path, "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PASSWORD, *args],
            input=ldif.encode() if ldif is not None else None,
            capture_output=True,
            timeout=30,
        )
        if answer.returncode != 0:
            raise RuntimeError(
                f"{tool} failed ({answer.returncode}): {answer.stderr.decode(errors='replace')}"
            )

    def add(self, ldif: str) -> None:
        """Add the entries of ``ldif`` (ldapadd)."""
        self._client("ldapadd", ldif=ldif)

    def modify(self, ldif: str) -> None:
        """Apply ``ldif``'s changes (ldapmodify)."""
        self._client("ldapmodify", ldif=ldif)

    def delete(self, dn: str) -> None:
        """Delete one entry (ldapdelete)."""
        self._client("ldapdelete", dn)

    def remove_member(self, group_name: str, uid: str) -> None:
        self.modify(
            f"dn: cn={group_name},{GROUPS}\nchangetype: modify\ndelete: member\n"
            f"member: uid={uid},{PEOPLE}\n"
        )

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
