"""Tools for tests and benchmarks that break things on purpose.

* :class:`~cloudtask.testing.proxy.TcpProxy` stands between a client and a server (ZooKeeper,
  MongoDB) and cuts, resets, slows or loses replies on demand;
  :class:`~cloudtask.testing.proxy.ProxyGroup` does it for every server of a cluster.
* A ZooKeeper ensemble whose members can be killed and restarted is
  :class:`cloudtask.localservers.ZooKeeperEnsemble`.

Example::

    from cloudtask.testing import TcpProxy

    with TcpProxy(zk_server.hosts) as proxy:
        zk = KazooClient(proxy.address)
        zk.start()
        proxy.cut()  # a partition: nothing flows, every socket stays open
        ...
        proxy.forward()  # it heals
"""

from __future__ import annotations

from cloudtask.testing.proxy import ProxyGroup, TcpProxy

__all__ = ["ProxyGroup", "TcpProxy"]
