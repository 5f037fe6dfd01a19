#!/bin/sh
# Makes sure the OpenID Connect provider of the login tests can run: Node.js and npm (Debian's
# packages when they are missing), and the oidc-provider package that tests/oidc/package.json
# pins, installed with `npm ci` into tests/oidc/node_modules (again when the lock file changes).
set -e
DIR="$(dirname "$0")/../tests/oidc"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "Node.js or npm is not installed; installing Debian's nodejs and npm with apt-get"
    SUDO=""
    if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
  else
    echo "Node.js and npm are not installed and apt-get is not available: the OpenID Connect login tests will be skipped." >&2
    exit 0
  fi
fi
STAMP="$DIR/node_modules/.cloudtask-installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt "$DIR/package-lock.json" ] && [ -f "$DIR/node_modules/oidc-provider/package.json" ]; then
  exit 0
fi
echo "installing the test OpenID Connect provider (npm ci in tests/oidc)"
npm ci --prefix "$DIR" --no-audit --no-fund --loglevel=error
touch "$STAMP"
