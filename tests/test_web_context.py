"""The app's one CloudTask extension (web.context.CloudTaskExtension): what create_app puts in
``app.extensions["cloudtask"]``, the helpers that read it, its store made on first use, and
its caches (the cluster view, the dashboard's figures, the OpenAPI document)."""

from __future__ import annotations

import threading

from helpers import make_web_app, web_login

from cloudtask.clusterview import ClusterView
from cloudtask.config import Config
from cloudtask.store import Store
from web import context
from web.context import CLUSTER_CACHE_SECONDS, CloudTaskExtension
from web.security import LoginThrottle


def test_create_app_keeps_one_extension_with_the_store_zk_and_throttle(store, zk):
    app = make_web_app(store, zk)
    ours = [key for key in app.extensions if key.startswith("cloudtask")]
    assert ours == ["cloudtask"]
    ext = app.extensions["cloudtask"]
    assert isinstance(ext, CloudTaskExtension)
    assert ext.store() is store and ext.zk is zk
    assert ext.paths.root == app.config["CLOUDTASK"].zookeeper.root
    assert isinstance(ext.throttle, LoginThrottle)
    with app.app_context():
        assert context.extension() is ext
        assert context.store() is store and context.zk() is zk
        assert context.paths() is ext.paths and context.throttle() is ext.throttle
        assert context.ops().store is store
        assert context.cluster().connected  # a real ZooKeeper


def test_the_throttle_counts_in_the_extensions_store(store):
    app = make_web_app(store)
    ext = app.extensions["cloudtask"]
    for _ in range(ext.throttle.limit):
        ext.throttle.failed("op1", "10.0.0.9")
    assert LoginThrottle(lambda: store).blocked("op1", "10.0.0.9")


def test_two_apps_keep_their_own_extensions(store):
    first, second = make_web_app(store), make_web_app(store)
    assert first.extensions["cloudtask"] is not second.extensions["cloudtask"]


def test_the_store_is_made_on_first_use_from_the_config(mongo_server, mongo_db_name):
    cfg = Config().with_section("mongodb", uri=mongo_server.uri, database=mongo_db_name)
    ext = CloudTaskExtension(cfg)
    made: list[Store] = []
    threads = [threading.Thread(target=lambda: made.append(ext.store())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(s) for s in made}) == 1 and made[0] is ext.store()
    ext.store().ping()


def test_without_zookeeper_the_cluster_is_disconnected(store):
    app = make_web_app(store)
    with app.app_context():
        assert context.zk() is None
        assert context.cluster() == ClusterView(connected=False)


def test_cached_values_last_their_time_unless_fresh_is_asked():
    now = [100.0]
    ext = CloudTaskExtension(Config(), clock=lambda: now[0])
    reads: list[int] = []

    def read() -> int:
        reads.append(1)
        return len(reads)

    assert ext.cached("k", 60, read) == 1
    assert ext.cached("k", 60, read) == 1  # cached
    assert ext.cached("k", 60, read, fresh=True) == 2
    assert ext.cached("k", 0, read) == 3  # a time of 0: read every time
    assert ext.cached("other", 60, read) == 4  # one value per key
    assert ext.cached("short", 0.2, read) == 5
    now[0] += 0.19
    assert ext.cached("short", 0.2, read) == 5
    now[0] += 0.02
    assert ext.cached("short", 0.2, read) == 6


def test_the_cluster_view_is_cached_briefly(monkeypatch):
    now = [100.0]
    ext = CloudTaskExtension(Config(), clock=lambda: now[0])
    assert not ext.cluster().connected  # no ZooKeeper: a disconnected view, cached like any
    seen: list[int] = []
    monkeypatch.setattr(ext, "_read_cluster", lambda: seen.append(1) or ClusterView())
    assert not ext.cluster().connected and seen == []
    assert ext.cluster(fresh=True).connected and seen == [1]
    now[0] += CLUSTER_CACHE_SECONDS - 0.01
    assert ext.cluster().connected and seen == [1]
    now[0] += 0.02
    assert ext.cluster().connected and seen == [1, 1]
    assert CLUSTER_CACHE_SECONDS == 2.0


def test_the_openapi_document_is_built_once_per_app(store, monkeypatch):
    import web.api.meta

    built = []
    real = web.api.meta.document
    monkeypatch.setattr(web.api.meta, "document", lambda table: built.append(1) or real(table))
    app = make_web_app(store)
    client = app.test_client()
    web_login(client, "viewer1", "viewer passphrase")
    first = client.get("/api/v1/openapi.json").get_json()
    assert client.get("/api/v1/openapi.json").get_json() == first
    assert built == [1]
    other = make_web_app(store).test_client()
    web_login(other, "viewer1", "viewer passphrase")
    assert other.get("/api/v1/openapi.json").status_code == 200 and built == [1, 1]
