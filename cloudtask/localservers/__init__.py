"""Run a local ZooKeeper and a local MongoDB-compatible server as child processes.

CloudTask needs ZooKeeper (coordination) and MongoDB (storage). For development, for
``cloudtask up`` and for the test suite, this package starts both on this machine:

* :class:`ZooKeeperServer` (:mod:`~cloudtask.localservers.zookeeper`) runs Apache ZooKeeper
  (``ZooKeeperServerMain``) with the local Java runtime. It finds ZooKeeper through
  ``$ZOOKEEPER_HOME`` (an Apache tarball folder) or Debian's ``zookeeper`` package
  (``/usr/share/java/zookeeper.jar``).
* :class:`MongoServer` (:mod:`~cloudtask.localservers.mongo`) runs nx-27017, a MongoDB
  wire-protocol server backed by SQLite (the ``embedded`` extra:
  ``pip install 'cloudtask[embedded]'``).
* :class:`ZooKeeperEnsemble` (:mod:`~cloudtask.localservers.ensemble`) runs several
  ZooKeeper members (``QuorumPeerMain``) on loopback, for failover tests: kill the leader,
  restart a member (``ensemble.hosts`` is the kazoo connection string;
  :mod:`cloudtask.testing` adds network faults).

What they share (free ports, the child-process wrapper, the stop at exit) is in
:mod:`~cloudtask.localservers.base`. Each server keeps its files (configuration, data, log)
in the folder it is given, listens on ``127.0.0.1`` and a free port unless told otherwise,
and is stopped together with its process group. Servers still running when the interpreter
exits are stopped then.

Example::

    from pathlib import Path

    from kazoo.client import KazooClient
    from pymongo import MongoClient

    from cloudtask.localservers import MongoServer, ZooKeeperServer

    with ZooKeeperServer(Path(".cloudtask/zookeeper")) as zk_server, MongoServer(
        Path(".cloudtask/mongo")
    ) as mongo_server:
        zk = KazooClient(zk_server.hosts)  # "127.0.0.1:<port>"
        zk.start()
        mongo = MongoClient(mongo_server.uri)  # "mongodb://127.0.0.1:<port>"
        ...
        zk.stop()
        mongo.close()
    # both servers are stopped here

Errors that keep a server from starting (no Java, no ZooKeeper, a port in use, a process
that exits or never answers) raise :class:`~cloudtask.exceptions.ServerStartError` with a
message saying what to do and, when there is one, the end of the server's log.
"""

from __future__ import annotations

from .base import POLL_INTERVAL as POLL_INTERVAL
from .base import free_port
from .ensemble import ENSEMBLE_JVM_OPTIONS as ENSEMBLE_JVM_OPTIONS
from .ensemble import SERVING_MODES as SERVING_MODES
from .ensemble import ZooKeeperEnsemble, ZooKeeperQuorumPeer
from .mongo import EMBEDDED_MISSING as EMBEDDED_MISSING
from .mongo import MongoServer
from .zookeeper import DEBIAN_SLF4J_SIMPLE_JAR as DEBIAN_SLF4J_SIMPLE_JAR
from .zookeeper import DEBIAN_ZOOKEEPER_JAR as DEBIAN_ZOOKEEPER_JAR
from .zookeeper import JAVA_MISSING as JAVA_MISSING
from .zookeeper import ZOOKEEPER_JVM_OPTIONS as ZOOKEEPER_JVM_OPTIONS
from .zookeeper import ZOOKEEPER_MISSING as ZOOKEEPER_MISSING
from .zookeeper import ZooKeeperServer, find_java, find_zookeeper_classpath

# The constants above (``X as X``) stay importable from here, as from the single module this
# package replaces; patch them in their own module, where the code reads them.
__all__ = [
    "MongoServer",
    "ZooKeeperEnsemble",
    "ZooKeeperQuorumPeer",
    "ZooKeeperServer",
    "find_java",
    "find_zookeeper_classpath",
    "free_port",
]
