"""The Faust app: three agents and one table.

* ``route`` over the three priority topics: decode, validate, classify, route; bad events become
  dead letters. A request with a dedupe key that arrived on its table partition (as Sluice's
  producers place it) is deduplicated there (``colocate``); any other is repartitioned by its key
  onto the dedupe topic.
* ``dedupe`` over the dedupe topic, with the ``dedupe`` table (changelogged): first requests go
  to their model topic, duplicates attach, repeats are answered from the cache.
* ``completions`` over the results topic: original results go back to ``dedupe`` by key.
* ``retry-<n>`` over each retry topic: hold a transiently failed request for that topic's backoff,
  then put it back on the model topic it came from.

Values are taken as raw bytes and decoded by the pipeline, so an undecodable event becomes a
dead letter instead of a Faust decode error. ``at_least_once`` is the guarantee: the agents
publish through a librdkafka producer (``sender``) that is settled, like Faust's own (table
changelogs), before source offsets are committed, so every acknowledged request is forwarded
before its offset moves; the downstream sinks are idempotent by request id. With
``processor.producer = "faust"`` they publish through Faust's producer instead, which Faust
flushes before each commit: librdkafka sends one produce request per partition (librdkafka
#1700) where Faust's packs every partition of a batch into one, and on a broker that turns each
request into an object-store write (tansu on S3) that is what the latency follows.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import faust

from core import clients
from core.catalog import Catalog, load_catalog
from core.errors import SluiceError
from core.headers import carried
from core.kafka import LazyProducer, Out, Producer
from core.metrics import ROUTED, observe_records
from core.quota import QuotaLedger, follow_ledger, ledger_wanted, load_ledger
from core.settings import Settings
from core.topics import Topics
from schemas import CacheKind, InferenceRequest, InferenceResult, ResultStatus, Serde
from stream_processors.classifier import Classifier
from stream_processors.colocate import Colocated
from stream_processors.dedupe import DedupeStage
from stream_processors.embedding import MiniLMEmbedder
from stream_processors.pipeline import RequestPipeline
from stream_processors.security import faust_credentials
from stream_processors.semantic import SemanticStage
from stream_processors.sender import KafkaSender
from stream_processors.transport import App, acting_on

__all__ = ["create_app", "faust_broker_urls"]

logger = logging.getLogger(__name__)


def faust_broker_urls(settings: Settings) -> list[str]:
    return [f"kafka://{hp.strip()}" for hp in settings.kafka.bootstrap_servers.split(",")]


def _faust_compression(kind: str) -> str | None:
    return None if kind in ("", "none") else kind


Send = Callable[[list[Out]], Awaitable[None]]


def _semantic_stage(app: faust.App, settings: Settings, catalog: Catalog, pipeline: RequestPipeline) -> SemanticStage:
    ps = settings.processor
    table = app.Table(
        "semantic",
        partitions=settings.kafka.partitions,
        schema=faust.Schema(key_type=str, key_serializer="json", value_serializer="json"),
    )
    embedder = MiniLMEmbedder(ps.semantic.model_path)
    # Loaded before the worker joins its group: a router (re)started with the cache on takes its
    # partitions only once it can answer lookups, so no assigned lookup partition sits unread for
    # the seconds the model takes to load (a lookup sent meanwhile, right after a restart, was
    # seen to go unanswered).
    embedder.load()
    lookup_topic = Topics(settings.topic_prefix).semantic

    # assigned_actives() builds a set of every assigned partition; it changes only on a
    # rebalance, so a second-old answer is fine (a stale one only costs a hop or a cache miss).
    owned: dict[str, Any] = {"at": 0.0, "parts": frozenset()}

    def owns(partition: int) -> bool:
        now = time.monotonic()
        if now - owned["at"] > 1.0:
            owned["parts"] = frozenset(
                tp.partition for tp in app.assignor.assigned_actives() if tp.topic == lookup_topic
            )
            owned["at"] = now
        return partition in owned["parts"]

    return SemanticStage(
        table,
        pipeline.emit,
        catalog,
        ps,
        embedder,
        pipeline.router.backlog,
        partitions=settings.kafka.partitions,
        owns=owns,
    )


def _semantic_agents(
    app: faust.App,
    stage: SemanticStage,
    serde: Serde,
    topics: Topics,
    settings: Settings,
    send: Send,
    index_topic: faust.TopicT,
) -> None:
    cfg = settings.processor.semantic
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    lookup_topic = app.topic(topics.semantic, partitions=settings.kafka.partitions, internal=False, **raw)

    @app.agent(lookup_topic, name="semantic")  # type: ignore[untyped-decorator,misc]
    async def lookup(stream: faust.StreamT[bytes]) -> None:
        """Batches of requests the exact cache missed: answered from a near-duplicate, or routed.
        No table is written here (that is the index agent's), so batching is safe."""
        # The model loads off the event loop (seconds); lookups wait for it, routing does not.
        await asyncio.to_thread(stage.embedder.load)
        async for events in stream.take_events(cfg.batch_size, within=cfg.batch_wait_s):
            batch = []
            for event in events:
                try:
                    batch.append(
                        (serde.decode(InferenceRequest, event.value), event.value, list(event.message.headers or []))
                    )
                except SluiceError as exc:
                    logger.error(
                        "semantic lookup skipped %s@%d: %s", event.message.partition, event.message.offset, exc
                    )
            items, texts = stage.prepare(batch)
            vectors = await asyncio.to_thread(stage.vectors, texts) if texts else None
            await send(stage.finish(items, texts, vectors))

    @app.agent(index_topic, name="semantic-index")  # type: ignore[untyped-decorator,misc]
    async def index(stream: faust.StreamT[bytes]) -> None:
        """Owns the semantic table: completions of looked-up requests become entries; ticks."""
        async for event in stream.events():
            kind = dict(event.message.headers or []).get("kind")
            partition = event.message.partition
            try:
                if kind == b"completed":
                    result = serde.decode(InferenceResult, event.value)
                    # The entry's sentence embedding is computed now, off the lookup path: a later
                    # near-duplicate then needs only its own.
                    text = stage.indexable_text(result)
                    static = None
                    if text is not None:
                        static, full = await asyncio.to_thread(stage.entry_vectors, text)
                        stage.remember_vectors([text], full[None, :])
                    stage.on_completed(result, partition, static)
                else:
                    stage.sweep(partition)
            except (SluiceError, ValueError, KeyError) as exc:
                logger.error("semantic index skipped %s@%d: %s", partition, event.message.offset, exc)


def _local_dedupe(app: faust.App, table: Any, dedupe_topic: str) -> tuple[int, dict[str, frozenset[int]]]:
    """The dedupe table's partition count (0 when the hop must always be taken) and, per request
    topic, the partitions this worker may deduplicate in place now (``Colocated``)."""
    n = app.consumer.topic_partitions(table.changelog_topic_name)
    if not n or app.consumer.topic_partitions(dedupe_topic) != n:
        return 0, {}
    actives = app.assignor.assigned_actives()
    owned = {tp.partition for tp in actives if tp.topic == table.changelog_topic_name} & {
        tp.partition for tp in actives if tp.topic == dedupe_topic
    }
    topics = {tp.topic for tp in actives} - {dedupe_topic, table.changelog_topic_name}
    return n, {t: Colocated.local_partitions(n, app.consumer.topic_partitions(t), owned) for t in topics}


def _quota_ledger(settings: Settings, serde: Serde) -> QuotaLedger | None:
    """The quota ledger, rebuilt from its topic before the worker joins its group and then kept
    following it (other routers' admissions and releases); None when no tenant or key has a quota."""
    if not ledger_wanted(settings):
        return None
    ledger = QuotaLedger(settings.tenants.token_quotas)
    reader = load_ledger(settings, serde, ledger)
    stop = threading.Event()
    threading.Thread(target=follow_ledger, args=(reader, serde, ledger, stop), name="quota-ledger", daemon=True).start()
    return ledger


def create_app(
    settings: Settings, catalog: Catalog | None = None, *, classifier: Classifier | None = None
) -> faust.App:
    """The router app; ``classifier`` replaces the rule classifier (the seam for a learned one)."""
    catalog = catalog or load_catalog(settings.catalog_path)
    topics = Topics(settings.topic_prefix)
    serde = clients.serde(settings)
    ps = settings.processor
    quota = _quota_ledger(settings, serde)
    pipeline = RequestPipeline(
        catalog,
        topics,
        serde,
        ps,
        classifier=classifier,
        publish_status=settings.publish_status,
        tenancy=settings.tenants,
        quota=quota,
        at_risk_margin_s=settings.consumer.at_risk_margin_s,
    )
    faust_dir = settings.data_dir / "faust"
    faust_dir.mkdir(parents=True, exist_ok=True)
    app = App(
        f"{settings.topic_prefix}{ps.app_id}",
        fetch_max_wait_ms=settings.kafka.fetch_wait_max_ms,
        broker=faust_broker_urls(settings),
        broker_client_id=clients.client_id("router"),
        broker_credentials=faust_credentials(settings.kafka),
        producer_compression_type=_faust_compression(settings.kafka.compression_type),
        broker_session_timeout=settings.kafka.session_timeout_ms / 1000,
        broker_heartbeat_interval=settings.kafka.heartbeat_interval_ms / 1000,
        # at_least_once: sinks dedupe by request id. Faust's exactly_once was tried on Apache Kafka
        # with kill -9 of the router mid-traffic and let read_committed readers see every request
        # routed before the kill twice (README, "Guarantees"), so it is not offered.
        processing_guarantee="at_least_once",
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        topic_partitions=settings.kafka.partitions,
        topic_replication_factor=settings.kafka.replication_factor,
        # Topics (the table changelog included) are created explicitly by `ensure_topics`.
        topic_allow_declare=False,
        table_standby_replicas=0,
        store="memory://",
        web_enabled=False,
        datadir=str(faust_dir),
    )
    # The per-event logic this app runs (for embedding applications and tests to inspect).
    app.pipeline = pipeline
    app.semantic = None
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    source = app.topic(*topics.all_requests(), internal=False, **raw)
    dedupe_topic = app.topic(topics.dedupe, partitions=settings.kafka.partitions, internal=False, **raw)
    results_topic = app.topic(topics.results, internal=False, **raw)
    ledger_topic = app.topic(topics.quota_ledger, internal=False, **raw)
    table = app.Table(
        "dedupe",
        partitions=settings.kafka.partitions,
        schema=faust.Schema(key_type=str, key_serializer="json", value_serializer="json"),
    )
    semantic = _semantic_stage(app, settings, catalog, pipeline) if ps.semantic.enabled else None
    app.semantic = semantic
    stage = DedupeStage(table, pipeline.emit, ps, pipeline.router.backlog, semantic=semantic)
    colocated = Colocated(topics.dedupe, stage, serde)
    # Made on its first record, or by ``sender.open()`` (the worker's entry point, to fail at start
    # on a configuration librdkafka refuses): an app built only to inspect holds no connection.
    sender: KafkaSender | None = None
    if ps.producer == "librdkafka":
        lazy = LazyProducer(lambda: cast(Producer, clients.producer(settings.kafka, "router")))
        sender = app.sender = KafkaSender(cast(Producer, lazy))
    faust_topics: dict[str, Any] = {}

    model_topics = {t for m in catalog for t in topics.model_topics(m.name)}

    async def send(outs: list[Out]) -> None:
        for out in outs:
            record = out.record
            if isinstance(record, InferenceRequest):
                if out.topic in model_topics and record.route is not None:
                    ROUTED.labels(record.route.model, record.priority).inc()
            elif not isinstance(record, bytes):
                observe_records((record,), source="router")
            if sender is not None:
                sender.send(out.topic, out.key_bytes(), out.value(serde), out.headers, out.partition)
                continue
            if out.topic not in faust_topics:
                faust_topics[out.topic] = app.topic(out.topic, **raw)
            await faust_topics[out.topic].send(
                key=out.key_bytes(), value=out.value(serde), headers=list(out.headers), partition=out.partition
            )

    @app.agent(source, name="route")  # type: ignore[untyped-decorator,misc]
    async def route(stream: faust.StreamT[bytes]) -> None:
        """Decode, validate, classify and route; a keyed request is deduplicated here when it
        arrived on its table partition, else it goes on to the dedupe agent."""
        # Batches amortise the per-event async overhead; Faust acks a batch's events only after
        # the body has handled (and sent) all of them. A request settled in place writes the
        # table as its own event (acting_on), so its changelog entry goes to its own partition.
        async for events in stream.take_events(1000, within=0.005):
            n, local = _local_dedupe(app, table, topics.dedupe)
            for event in events:
                msg = event.message
                outs = pipeline.process(
                    event.value,
                    topic=msg.topic,
                    partition=msg.partition,
                    offset=msg.offset,
                    headers=list(msg.headers or []),
                    timestamp_ms=int(msg.timestamp * 1000) if msg.timestamp else None,
                )
                if n:

                    def settle(out: Out, event: Any = event) -> list[Out]:
                        with acting_on(event):
                            return colocated.on_request(out, event.message.partition)

                    outs = colocated.split(outs, msg.partition, n, local.get(msg.topic, ()), settle)
                await send(outs)

    @app.agent(dedupe_topic, name="dedupe")  # type: ignore[untyped-decorator,misc]
    async def dedupe(stream: faust.StreamT[bytes]) -> None:
        """Owns the dedupe table: forwards first requests, attaches duplicates, answers repeats."""
        async for event in stream.events():
            kind = dict(event.message.headers or []).get("kind")
            try:
                if kind == b"request":
                    request = serde.decode(InferenceRequest, event.value)
                    out = stage.on_request(request, event.value, event.message.partition, event.message.headers)
                elif kind == b"completed":
                    out = stage.on_completed(serde.decode(InferenceResult, event.value))
                else:
                    out = stage.sweep(event.message.partition)
            except SluiceError as exc:
                # Only the processor writes this topic; an undecodable event here is a bug, not input.
                logger.error("dedupe skipped %s@%d: %s", event.message.partition, event.message.offset, exc)
                continue
            await send(out)

    @app.agent(results_topic, name="completions")  # type: ignore[untyped-decorator,misc]
    async def completions(stream: faust.StreamT[bytes]) -> None:
        """Tap the results topic: update the backlog, and tell the dedupe agent what completed."""
        async for value in stream:
            try:
                result = serde.decode(InferenceResult, value)
            except SluiceError as exc:
                logger.error("completions skipped an undecodable result: %s", exc)
                continue
            if quota is not None and quota.release(result.request_id):
                # Any outcome ends what the request held against its tenant's quota.
                await ledger_topic.send(key=result.request_id.encode(), value=None)
            if result.deduplicated_from is not None and result.cache_kind is not CacheKind.SEMANTIC:
                continue  # answered by this processor (a duplicate or an exact cache hit)
            if result.engine_run_id:
                mine = pipeline.router.backlog.completed(result.model, result.request_id)
                pipeline.risk.pace.observe(result, mine=mine)
            if result.dedupe_key is not None:
                # A semantic hit completes its own content key too: its duplicates get the answer.
                await dedupe_topic.send(key=result.dedupe_key.encode(), value=value, headers=[("kind", b"completed")])
            if semantic is not None and result.engine_run_id and result.status is ResultStatus.SUCCEEDED:
                scope = semantic.scope(result.tenant).encode()
                await index_topic.send(
                    key=scope,
                    value=value,
                    headers=[("kind", b"completed")],
                    partition=semantic.partition_of(result.tenant),
                )

    def retry_agent(level: int, delay_s: float) -> None:
        topic = app.topic(topics.retry(level), internal=False, **raw)

        async def retry(stream: faust.StreamT[bytes]) -> None:
            """A delay queue: every event on this topic waits the same time, so waiting for the
            head in order never delays a later one past its due time."""
            async for event in stream.events():
                wait = event.message.timestamp + delay_s - time.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                target = dict(event.message.headers or []).get("target")
                if not target:
                    logger.error("retry event without a target topic at %s", event.message.offset)
                    continue
                await send([Out(target.decode(), event.message.key, event.value, carried(event.message.headers))])

        app.agent(topic, name=f"retry-{level}")(retry)

    for level, delay_ms in enumerate(settings.retry.backoff_ms):
        retry_agent(level, delay_ms / 1000)

    index_topic = app.topic(topics.semantic_index, partitions=settings.kafka.partitions, internal=False, **raw)
    if semantic is not None:
        _semantic_agents(app, semantic, serde, topics, settings, send, index_topic)

    @app.timer(ps.sweep_interval_s, on_leader=True)  # type: ignore[untyped-decorator,misc]
    async def sweep() -> None:
        # Table writes must go to the partition of the event being processed, so the sweep
        # runs as a tick event on each dedupe partition rather than here.
        for partition in range(settings.kafka.partitions):
            await dedupe_topic.send(key=None, value=b"", partition=partition, headers=[("kind", b"tick")])
            if semantic is not None:
                await index_topic.send(key=None, value=b"", partition=partition, headers=[("kind", b"tick")])

    return app
