#!/bin/sh
# Makes sure Debian's OpenLDAP server and clients are on this machine for the LDAP login tests
# (tests/test_ldap_login.py starts its own slapd, on loopback, in a folder of its own; the
# system's slapd service is never used). Installs the packages slapd and ldap-utils when it can.
set -e
if command -v slapd >/dev/null 2>&1 || [ -x /usr/sbin/slapd ]; then
  if command -v ldapadd >/dev/null 2>&1; then
    exit 0
  fi
fi
if command -v apt-get >/dev/null 2>&1; then
  echo "slapd or ldap-utils is not installed; installing Debian's packages with apt-get"
  SUDO=""
  if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq slapd ldap-utils >/dev/null
  exit 0
fi
echo "slapd and ldap-utils are not installed and apt-get is not available: the LDAP login tests will be skipped." >&2
exit 0
