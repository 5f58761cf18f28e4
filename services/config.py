"""All configuration in one pydantic-settings class; every field can be set by environment.

Names follow DESIGN.md section 7 (REDIS_URL, IAT_MODEL_DIR, ...). Services take a
``Settings`` instance as a typed dependency rather than reading the environment themselves.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IAT_", extra="ignore")

    # Store. Unset REDIS_URL: an embedded redis-server is started by the library.
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "IAT_REDIS_URL")
    )
    key_prefix: str = "iat"
    retention_days: float = Field(default=30.0, gt=0)
    max_sequence_length: int = Field(default=1024, gt=0, description="Lmax kept per user")
    # The instance stream is never trimmed ahead of its consumer groups; at this many entries
    # the source answers 503 + Retry-After instead (IAT_STREAM_MAXLEN, its old name, was a
    # MAXLEN that dropped entries the sequencer had not read).
    stream_max_backlog: int = Field(
        default=1_000_000, gt=0,
        validation_alias=AliasChoices("IAT_STREAM_MAX_BACKLOG", "IAT_STREAM_MAXLEN"),
        description="instance-stream entries at which ingest answers 503 (backpressure)",
    )
    # Partitions of the instance stream by user (storage/stream.py); 1 keeps the one stream key
    # of earlier releases. The backlog bound above applies to each partition.
    stream_partitions: int = Field(default=1, ge=1, le=1024, description="instance-stream partitions (by user id)")
    stream_trim_interval_s: float = Field(default=1.0, gt=0, description="sequencer: XTRIM MINID behind the groups this often")
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After of the 503s of store errors and backpressure")
    # An evicting maxmemory-policy deletes records and whole sequences silently (every key of
    # the store carries a TTL, so volatile-* evicts them as allkeys-* does): services refuse to
    # start on one, and readiness fails, unless this is set.
    allow_evicting_redis: bool = False
    history_scan_factor: int = Field(
        default=4, ge=1,
        description="a history read of L instances examines at most this x L sequence members, "
                    "reaching back past missing and other-version records")

    # Models and data.
    model_dir: Path = Path("artifacts/models")
    data_dir: Path = Path("../shared/data")
    runtime: str = Field(default="torchscript", pattern="^(torchscript|aoti|eager)$")
    device: str = "auto"
    torch_threads: int = Field(
        default=0, ge=0,
        description="torch intra-op threads per service process; 0 = CPUs available (affinity and "
                    "cgroup CPU quota) divided by the model workers that run forwards concurrently")

    # Ranking.
    max_candidates: int = Field(default=2000, gt=0)
    history_delay_ms: int = Field(default=0, ge=0, description="history must be this much older than the request")
    degrade_on_store_error: bool = False
    default_model: str | None = None
    model_threads: int = Field(default=2, gt=0)
    # Freed activations stay mapped for the next forward instead of being unmapped and faulted
    # in again (services/allocator.py: 2,000-3,600 page faults per C = 500 forward without it).
    malloc_keep_mb: int = Field(default=256, ge=0,
                                description="freed memory glibc malloc keeps per arena (MiB); 0 = glibc's defaults")
    # Several processes serve Score on the same gRPC and HTTP ports (SO_REUSEPORT), so that
    # throughput scales with cores past one process's GIL (services/ranking/workers.py).
    ranking_workers: int = Field(default=1, gt=0, description="ranking service processes sharing its ports")
    # Where the ranking workers' Prometheus values meet (prometheus_client multiprocess mode);
    # unset: a fresh temporary directory per `iat serve ranking` with more than one worker.
    prometheus_multiproc_dir: Path | None = Field(
        default=None, validation_alias=AliasChoices("PROMETHEUS_MULTIPROC_DIR", "IAT_PROMETHEUS_MULTIPROC_DIR"))
    reload_interval_s: float = Field(default=10.0, ge=0, description="0 disables hot reload")
    redis_timeout_s: float = Field(default=1.0, gt=0)
    history_cache_mb: float = Field(default=64.0, ge=0, description="decoded and encoded histories kept for reuse; 0 disables")
    item_cache_size: int = Field(default=65_536, ge=0, description="candidate encodings kept per model; 0 disables")
    # Concurrent Scores for one model wait at most this long to share one forward
    # (services/ranking/batching.py); 0 = each request runs its own forward.
    score_batch_wait_ms: float = Field(default=0.0, ge=0, le=1000,
                                       description="cross-request batching: longest wait for company; 0 disables")
    score_batch_max_candidates: int = Field(default=4096, gt=0,
                                            description="cross-request batching: a batch this full runs at once")

    # Source.
    ingest_max_request: int = Field(default=1024, gt=0, description="instances per POST, more is rejected")
    ingest_max_batch: int = Field(default=512, gt=0, description="instances per coalesced model forward")
    ingest_max_wait_ms: float = Field(default=2.0, ge=0)
    raw_stream: str | None = Field(default=None, description="also ingest raw instances from this Redis stream")
    # POST /v1/labels joins a label arriving at most this long after its instance; a later one is
    # refused and counted. At most 49.7 days: records keep arrival offsets as uint32 ms.
    label_window_s: float = Field(default=86_400.0, ge=0, le=4_294_967.295,
                                  description="late labels are joined within this window")

    # Sequencer.
    sequencer_workers: int = Field(default=1, gt=0)
    sequencer_batch_size: int = Field(default=512, gt=0)
    claim_idle_ms: int = Field(default=30_000, ge=0, description="pending this long: consumer presumed dead")
    consumer_name: str | None = None
    sequencer_partitions: str = Field(
        default="all",
        description='stream partitions this sequencer reads: "all", a list "0,2,5", or "k/n" '
                    "(every partition p with p % n == k)")

    # Trainer (services/trainer): online learning from the instance stream (its own group).
    trainer_dir: Path = Field(default=Path("runs/trainer"), description="the trainer's checkpoint and staging files")
    trainer_partitions: str = Field(default="all", description='stream partitions this trainer reads (as IAT_SEQUENCER_PARTITIONS)')
    trainer_batch_size: int = Field(default=256, gt=0, description="instances per optimiser step")
    trainer_publish_every: int = Field(default=10_000, gt=0, description="publish a version every this many trained instances")
    trainer_publish_interval_s: float = Field(default=600.0, ge=0, description="... or this often when anything was trained; 0: by count only")
    trainer_checkpoint_every: int = Field(default=0, ge=0, description="checkpoint every this many instances; 0: at each publish")
    trainer_flush_s: float = Field(default=2.0, ge=0, description="train a partial batch after the stream was idle this long; 0: never")
    trainer_seed: int = Field(default=0, ge=0)
    # 3e-4: on the KuaiRand-Pure replay (models/RESULTS.md) 2e-3 first loses to the frozen model
    trainer_lr: float = Field(default=3e-4, gt=0, description="Adam learning rate of both models online")
    trainer_history_limit: int = Field(default=127, gt=0, description="past InsEmbs fetched per instance (Eq. 8: L - 1)")
    trainer_window: int = Field(default=2048, gt=0, description="progressive validation: the last this many instances")
    # Training across trainer processes (DDP, services/trainer/lockstep.py); 1: one process.
    trainer_world_size: int = Field(default=1, ge=1, le=1024, description="trainer processes training together (DDP)")
    trainer_rank: int = Field(default=0, ge=0, description="this trainer's rank, 0 .. IAT_TRAINER_WORLD_SIZE - 1")
    trainer_dist_url: str = Field(default="tcp://127.0.0.1:29500",
                                  description="torch.distributed rendezvous (init_method) of the trainer processes")
    trainer_dist_timeout_s: float = Field(default=600.0, gt=0,
                                          description="a collective waiting this long for a peer fails (the job restarts)")
    trainer_http_port: int = 8003

    # Background workers (sequencer consumers, the source's raw-stream consumer): a failed pass
    # is retried after base * 2**failures seconds, at most cap; /healthz fails when one is dead,
    # or has had no pass end, or no pass succeed, for worker_stall_s (an unreachable store or a
    # full stream backlog aside: a restart cannot cure those).
    worker_backoff_base_s: float = Field(default=0.05, gt=0)
    worker_backoff_cap_s: float = Field(default=5.0, gt=0)
    worker_stall_s: float = Field(default=300.0, gt=0, description="liveness: a worker without progress this long fails /healthz")

    # Network. Loopback unless told otherwise.
    host: str = "127.0.0.1"
    # Access: when set, /v1/ HTTP routes and gRPC Score need `Authorization: Bearer <token>`
    # (services/security.py); health, readiness and metrics stay open.
    api_token: SecretStr | None = None
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0, description="HTTP bodies over this: 413")
    grpc_max_receive_bytes: int = Field(default=4 * 1024 * 1024, gt=0, description="gRPC messages over this: RESOURCE_EXHAUSTED")
    ranking_grpc_port: int = 50051
    ranking_http_port: int = 8000
    source_http_port: int = 8001
    sequencer_http_port: int = 8002

    # Harness: load tests, benchmarks and the test suite (never read by a service).
    test_model_dir: Path | None = Field(default=None, description="a quick export to reuse instead of training one")
    grpc_target: str | None = Field(default=None, description="Locust: the ranking service's gRPC host:port")
    source_url: str | None = Field(default=None, description="Locust: the source service's base URL")
    loadtest_max_users: int = Field(default=0, ge=0, description="Locust: only the first N users (0: all)")
    loadtest_candidates: str = Field(default="100,500", pattern=r"^\d+,\d+$", description="Locust: candidates per Score, lo,hi")
    loadtest_ingest_batch: int = Field(default=16, gt=0)

    @field_validator("sequencer_partitions", "trainer_partitions")
    @classmethod
    def _partition_spec(cls, value: str, info) -> str:
        # the syntax; the range is checked against stream_partitions below
        parse_partitions(value, None, f"IAT_{info.field_name.upper()}")
        return value.strip()

    @model_validator(mode="after")
    def _owned_partitions_exist(self) -> Settings:
        parse_partitions(self.sequencer_partitions, self.stream_partitions)  # ValueError naming the setting
        if self.trainer_rank >= self.trainer_world_size:
            raise ValueError(f"IAT_TRAINER_RANK: must be < IAT_TRAINER_WORLD_SIZE ({self.trainer_world_size}), "
                             f"got {self.trainer_rank}")
        self.trainer_owned_partitions  # noqa: B018 (the same check for the trainer's share)
        return self

    @property
    def owned_partitions(self) -> list[int]:
        """The stream partitions this sequencer reads, in order."""
        return parse_partitions(self.sequencer_partitions, self.stream_partitions)

    @property
    def trainer_owned_partitions(self) -> list[int]:
        """The stream partitions this trainer reads, in order: IAT_TRAINER_PARTITIONS, whose
        default "all" means, across DDP ranks, the partitions p with p % world == rank."""
        spec = self.trainer_partitions
        if spec.strip().lower() == "all" and self.trainer_world_size > 1:
            spec = f"{self.trainer_rank}/{self.trainer_world_size}"
        return parse_partitions(spec, self.stream_partitions, "IAT_TRAINER_PARTITIONS")

    @property
    def movielens_dir(self) -> Path:
        return self.data_dir / "movielens-100k"

    @property
    def token(self) -> str | None:
        """The bearer token in clear, or None when access is open (an empty value is no token)."""
        return (self.api_token.get_secret_value() or None) if self.api_token is not None else None


def parse_partitions(spec: str, partitions: int | None, field: str = "IAT_SEQUENCER_PARTITIONS") -> list[int]:
    """``"all"``, ``"0,2,5"`` or ``"k/n"`` -> the partitions of ``range(partitions)`` it names.
    ``partitions`` None: check the syntax only (and return the listed ones, if any). Errors
    name ``field``, the setting the spec came from."""
    text = spec.strip().lower()
    if text == "all":
        return list(range(partitions or 0))
    try:
        if "/" in text:
            k, n = (int(x) for x in text.split("/"))
            if not 0 <= k < n:
                raise ValueError
            chosen = [] if partitions is None else [p for p in range(partitions) if p % n == k]
        else:
            chosen = sorted({int(x) for x in text.split(",")})
            if any(p < 0 for p in chosen):
                raise ValueError
    except ValueError:
        raise ValueError(f'{field}: expected "all", partition numbers like "0,2" or "k/n" with 0 <= k < n, '
                         f"got {spec!r}") from None
    if partitions is None:
        return chosen
    outside = [p for p in chosen if p >= partitions]
    if outside:
        raise ValueError(f"{field}: partitions {outside} do not exist, IAT_STREAM_PARTITIONS is {partitions}")
    if not chosen:
        raise ValueError(f"{field}: {spec!r} names no partition of the {partitions} (IAT_STREAM_PARTITIONS)")
    return chosen


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
