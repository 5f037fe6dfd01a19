#!/bin/sh
# Makes sure an Apache ZooKeeper distribution is on this machine; installs Debian's package when it can.
set -e
if [ -n "$ZOOKEEPER_HOME" ]; then
  echo "ZooKeeper: using ZOOKEEPER_HOME=$ZOOKEEPER_HOME"
  exit 0
fi
if [ -f /usr/share/java/zookeeper.jar ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  echo "ZooKeeper is not installed; installing Debian's zookeeper package with apt-get"
  SUDO=""
  if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq zookeeper >/dev/null
  exit 0
fi
echo "ZooKeeper is not installed and apt-get is not available." >&2
echo "Install Apache ZooKeeper (3.6 or newer) and set ZOOKEEPER_HOME to its folder, then run this again." >&2
exit 1
