#!/bin/sh
# Makes sure a Chromium browser is on this machine for the browser tests; installs Debian's
# package when it can. Playwright drives this system browser: nothing is downloaded by it.
set -e
if [ -n "$CLOUDTASK_CHROMIUM" ] && [ -x "$CLOUDTASK_CHROMIUM" ]; then
  exit 0
fi
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  echo "Chromium is not installed; installing Debian's chromium package with apt-get"
  SUDO=""
  if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  exit 0
fi
echo "Chromium is not installed and apt-get is not available: the browser tests will be skipped." >&2
echo "Install chromium (or set CLOUDTASK_CHROMIUM to a Chromium binary) to run them." >&2
exit 0
