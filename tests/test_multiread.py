"""Many znodes read 50 a request with ZooKeeper's multiRead, against the real server."""

from __future__ import annotations

import uuid

from cloudtask.center import multiread
from cloudtask.center.multiread import BATCH, read_many


def test_read_many_gives_every_node_that_exists_with_its_data_and_stat(zk, monkeypatch):
    monkeypatch.setattr(multiread, "IN_FLIGHT", 3)  # several rounds of requests in flight
    root = f"/multiread-{uuid.uuid4().hex}"
    count = 3 * 3 * BATCH + 7
    paths = [f"{root}/a{i % 3}/t{i:05d}" for i in range(count)]
    for i, path in enumerate(paths):
        zk.create(path, f"node {i}".encode() * (i % 5 + 1), makepath=True)
    gone = paths[2 * BATCH + 1]
    zk.delete(gone)
    got = {path: (data, stat) for path, data, stat in read_many(zk, paths)}
    assert set(got) == set(paths) - {gone}  # a node that is gone is left out
    for i, path in enumerate(paths):
        if path == gone:
            continue
        data, stat = zk.get(path)
        assert got[path][0] == data == f"node {i}".encode() * (i % 5 + 1)
        assert got[path][1].mzxid == stat.mzxid and got[path][1].version == stat.version
    assert list(read_many(zk, [])) == []


def test_one_request_a_node_when_the_server_has_no_multiread(zk):
    root = f"/multiread-{uuid.uuid4().hex}"
    zk.create(f"{root}/x", b"1", makepath=True)
    got = list(multiread._one_by_one(zk, [f"{root}/x", f"{root}/missing"]))
    assert [(p, d) for p, d, _ in got] == [(f"{root}/x", b"1")]
