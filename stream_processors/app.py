"""The Faust app: one agent over the three priority topics, forwarding to model topics or the DLQ.

Values are taken as raw bytes and decoded by the pipeline, so an undecodable event becomes a
dead letter instead of a Faust decode error. ``at_least_once`` is the guarantee: Faust flushes
the producer before it commits the source offsets, so every acknowledged request is forwarded
before its offset moves; the downstream sinks are idempotent by request id.
"""

from __future__ import annotations

import logging
from typing import Any

import faust

from schemas import Serde
from sluice.catalog import Catalog, load_catalog
from sluice.settings import Settings
from sluice.topics import Topics
from stream_processors.pipeline import RequestPipeline

__all__ = ["create_app", "faust_broker_urls"]

logger = logging.getLogger(__name__)


def faust_broker_urls(settings: Settings) -> list[str]:
    return [f"kafka://{hp.strip()}" for hp in settings.kafka.bootstrap_servers.split(",")]


def _credentials(settings: Settings) -> Any:
    k = settings.kafka
    if k.sasl_mechanism and k.sasl_username is not None:
        return faust.SASLCredentials(
            username=k.sasl_username, password=k.sasl_password or "", mechanism=k.sasl_mechanism
        )
    return None


def create_app(settings: Settings, catalog: Catalog | None = None) -> faust.App:
    catalog = catalog or load_catalog(settings.catalog_path)
    topics = Topics(settings.topic_prefix)
    pipeline = RequestPipeline(catalog, topics, Serde.from_settings(settings.schema_registry), settings.processor)
    faust_dir = settings.data_dir / "faust"
    faust_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{settings.topic_prefix}{settings.processor.app_id}",
        broker=faust_broker_urls(settings),
        broker_credentials=_credentials(settings),
        broker_session_timeout=settings.kafka.session_timeout_ms / 1000,
        broker_heartbeat_interval=settings.kafka.heartbeat_interval_ms / 1000,
        # tansu does not serve the idempotent-producer id request aiokafka makes, so
        # exactly_once cannot start there; sinks dedupe by request id instead.
        processing_guarantee="at_least_once",
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        topic_partitions=settings.kafka.partitions,
        topic_replication_factor=settings.kafka.replication_factor,
        topic_allow_declare=False,
        store="memory://",
        web_enabled=False,
        datadir=str(faust_dir),
    )
    source = app.topic(*topics.all_requests(), key_serializer="raw", value_serializer="raw", internal=False)
    out_topics: dict[str, faust.TopicT] = {}

    def out(name: str) -> faust.TopicT:
        if name not in out_topics:
            out_topics[name] = app.topic(name, key_serializer="raw", value_serializer="raw")
        return out_topics[name]

    @app.agent(source, name="route")  # type: ignore[untyped-decorator,misc]
    async def route(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            msg = event.message
            fwd = pipeline.process(
                event.value,
                topic=msg.topic,
                partition=msg.partition,
                offset=msg.offset,
                headers=list(msg.headers or []),
            )
            await out(fwd.topic).send(key=fwd.key, value=fwd.value, headers=fwd.headers)

    return app
