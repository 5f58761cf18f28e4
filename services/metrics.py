"""Every Prometheus metric the services export, defined in one place.

Names are part of the SRE contract (dashboards and alerts read them): change them only with
a reason stated. Each service process imports this module once; metrics of services that a
process does not run simply stay at zero.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Latency buckets from 100 us to 2.5 s: Score p99 budgets are tens of ms.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025,
    0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)
SIZE_BUCKETS = (0, 1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

# --- process ---------------------------------------------------------------------------
TORCH_THREADS = Gauge(
    "iat_torch_threads", "torch intra-op threads this process uses (IAT_TORCH_THREADS, or CPUs / model workers)",
)
CPUS_AVAILABLE = Gauge(
    "iat_cpus_available", "CPUs this process may use: its affinity capped by the cgroup CPU quota",
)

# --- ranking -------------------------------------------------------------------------
SCORE_LATENCY = Histogram(
    "iat_ranking_request_seconds", "Score latency end to end, by protocol and status",
    ["protocol", "status"], buckets=LATENCY_BUCKETS,
)
SCORE_STAGE_LATENCY = Histogram(
    "iat_ranking_stage_seconds", "Score latency per stage (fetch, assemble, model, total)",
    ["stage"], buckets=LATENCY_BUCKETS,
)
HISTORY_LENGTH = Histogram(
    "iat_ranking_history_length", "History instances used per request after truncation",
    buckets=SIZE_BUCKETS,
)
CANDIDATES = Histogram(
    "iat_ranking_candidates", "Candidates per Score request", buckets=SIZE_BUCKETS,
)
SCORE_BATCH_REQUESTS = Histogram(
    "iat_ranking_score_batch_requests",
    "Score requests per forward of the cross-request batcher (IAT_SCORE_BATCH_WAIT_MS > 0)",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
SCORE_BATCH_CANDIDATES = Histogram(
    "iat_ranking_score_batch_candidates", "Candidates per forward of the cross-request batcher",
    buckets=SIZE_BUCKETS + (4096, 8192),
)
MODEL_INFO = Gauge(
    "iat_ranking_model_info", "Loaded models (value 1), with version and source-model version",
    ["model", "version", "source_version", "runtime", "device"],
)
DEGRADED = Counter(
    "iat_ranking_degraded_total", "Requests scored with an empty history because the store failed",
)
MISSING_RECORDS = Counter(
    "iat_ranking_missing_records_total", "Sequence members whose record was missing (expired)",
)
HISTORY_SKIPPED = Counter(
    "iat_ranking_history_skipped_total",
    "Sequence members a history read skipped, by reason: missing (record gone; the member is "
    "removed), version_mismatch (another source-model version), incompatible (another layout)",
    ["reason"],
)
MODEL_RELOADS = Counter(
    "iat_ranking_model_reloads_total", "Model (re)load attempts by outcome", ["model", "outcome"],
)
HISTORY_CACHE = Counter(
    "iat_ranking_history_cache_lookups_total",
    "Score history lookups by outcome: hit (same stored history as a recent Score: decode and "
    "encoding reused) or miss", ["outcome"],
)
HISTORY_CACHE_BYTES = Gauge(
    "iat_ranking_history_cache_bytes", "Bytes held by the history cache (bounded by IAT_HISTORY_CACHE_MB)",
)
SCORE_BY_HISTORY_CACHE = Histogram(
    "iat_ranking_score_by_history_cache_seconds",
    "Score latency in the service (stage 'total') by history-cache outcome: hit, miss, or none "
    "(cache off, empty or degraded history, no store read); fine buckets (x1.25) for p50 estimates",
    ["outcome"], buckets=tuple(round(0.0005 * 1.25 ** k, 6) for k in range(39)),
)
ITEM_CACHE = Counter(
    "iat_ranking_item_cache_lookups_total", "Candidate encodings looked up, by outcome (hit, miss)", ["outcome"],
)

# --- source --------------------------------------------------------------------------
INGEST_LATENCY = Histogram(
    "iat_source_ingest_seconds", "POST /v1/instances latency", buckets=LATENCY_BUCKETS,
)
INSTANCES = Counter(
    "iat_source_instances_total",
    "Instances by outcome (accepted, rejected, unavailable: a store error, backpressure: the stream's backlog is full)",
    ["outcome"],
)
LABEL_UPDATES = Counter(
    "iat_source_label_updates_total",
    "Late labels per task by outcome (stored, duplicate, conflict, unknown, window_closed, early, "
    "incompatible; rejected: a bad batch, nothing stored)",
    ["outcome"],
)
INGEST_BATCH_SIZE = Histogram(
    "iat_source_batch_size", "Instances per model forward after coalescing", buckets=SIZE_BUCKETS,
)

# --- sequencer -----------------------------------------------------------------------
SEQUENCER_APPENDED = Counter(
    "iat_sequencer_appended_total", "Stream entries appended to user sequences",
)
SEQUENCER_REDELIVERIES = Counter(
    "iat_sequencer_redeliveries_total", "Pending entries claimed again from a dead consumer",
)
# Per stream partition (IAT_STREAM_PARTITIONS; "0" only when unpartitioned), exported by the
# sequencer that owns the partition: sum() over partitions for the whole stream, max() for the
# partition furthest behind.
STREAM_LAG = Gauge(
    "iat_stream_lag", "Entries in a stream partition not yet delivered to its consumer group", ["partition"],
)
STREAM_LENGTH = Gauge(
    "iat_stream_length", "Entries in a partition of the instance stream (what the backlog bound applies to)",
    ["partition"],
)
STREAM_PENDING = Gauge(
    "iat_stream_pending", "Entries of a stream partition delivered to its consumer group and not yet acknowledged",
    ["partition"],
)
STREAM_TRIMMED = Counter(
    "iat_stream_trimmed_total", "Acknowledged entries removed from the stream (XTRIM MINID behind the groups)",
)
STREAM_DROPPED = Counter(
    "iat_stream_dropped_total",
    "Entries acked without being sequenced: malformed, or deleted_while_pending (trimmed by another writer: "
    "their instances are lost to the sequences)",
    ["reason"],
)

# --- trainer (services/trainer) --------------------------------------------------------
TRAINER_INSTANCES = Counter("iat_trainer_instances_total", "Instances the trainer trained on", ["partition"])
TRAINER_DEFAULTED_LABELS = Counter(
    "iat_trainer_defaulted_labels_total",
    "Task labels still unknown when an instance's label window closed, trained as the policy says (0)", ["task"],
)
TRAINER_SKIPPED = Counter(
    "iat_trainer_skipped_total", "Stream entries the trainer acked without training on them", ["reason"],
)
TRAINER_WAITING = Gauge("iat_trainer_waiting_instances", "Instances read and waiting for their labels or window")
TRAINER_PUBLISHED = Counter("iat_trainer_published_total", "Versions the trainer published")
TRAINER_CHECKPOINTS = Counter("iat_trainer_checkpoints_total", "Checkpoints the trainer wrote")
TRAINER_STEP_SECONDS = Histogram(
    "iat_trainer_step_seconds", "One optimiser step of both models on one batch",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
TRAINER_LOCKSTEP_STEPS = Counter(
    "iat_trainer_lockstep_steps_total",
    "DDP steps this rank took, by its batch: full, partial (flushed) or empty (zero loss: peers had data)", ["batch"],
)
TRAINER_LOCKSTEP_WAIT_SECONDS = Histogram(
    "iat_trainer_lockstep_wait_seconds", "DDP: one exchange of the ranks' buffer sizes (time waiting for peers)",
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
PROGRESSIVE_AUC = Gauge(
    "iat_progressive_auc", "Predict-then-train AUC over the trainer's sliding window", ["model", "task"],
)
PROGRESSIVE_LOGLOSS = Gauge(
    "iat_progressive_logloss", "Predict-then-train LogLoss over the trainer's sliding window", ["model", "task"],
)

# --- every service's background workers ------------------------------------------------
WORKER_ERRORS = Counter(
    "iat_worker_errors_total",
    "Failed passes of a background worker by worker role and error class; each is retried after a backoff",
    ["worker", "error"],
)

# --- store (every service) -----------------------------------------------------------
STORE_USED_MEMORY = Gauge(
    "iat_store_used_memory_bytes", "Redis used_memory per server (node), read at each scrape", ["node"],
)
STORE_MAXMEMORY = Gauge(
    "iat_store_maxmemory_bytes", "Redis maxmemory per server (node); 0 = no limit", ["node"],
)
