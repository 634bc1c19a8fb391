"""The one Kafka client factory: every producer, consumer and admin client Sluice builds.

Configuration dicts come from ``core.kafka_config``; this module adds what every client needs
on top: a ``client.id`` naming its component (so broker logs, quotas and ACLs can tell Sluice's
clients apart) and an ``error_cb`` that classifies client errors and logs them without flooding
(librdkafka reports a lost connection once per broker per retry).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer, ShareConsumer
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

from core.kafka_config import admin_config, consumer_config, producer_config, share_consumer_config
from core.metrics import KAFKA_CLIENT_ERRORS
from core.settings import KafkaSettings, Settings
from schemas import Serde

__all__ = [
    "ClientErrorClass",
    "admin",
    "classify",
    "client_id",
    "consumer",
    "error_callback",
    "producer",
    "serde",
    "share_consumer",
]

logger = logging.getLogger(__name__)


class ClientErrorClass(StrEnum):
    FATAL = "fatal"  # the client cannot continue (e.g. a fenced idempotent producer)
    CONFIGURATION = "configuration"  # will not heal by itself: credentials, TLS, authorization
    TRANSIENT = "transient"  # connection loss, broker restart: librdkafka retries on its own
    OTHER = "other"


_TRANSIENT = {
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._RESOLVE,
    KafkaError._TIMED_OUT,
    KafkaError._MSG_TIMED_OUT,
    KafkaError._WAIT_COORD,
    KafkaError._UNKNOWN_BROKER,
}
_CONFIGURATION = {
    KafkaError._AUTHENTICATION,
    KafkaError._SSL,
    KafkaError._INVALID_ARG,
    KafkaError._UNKNOWN_PROTOCOL,
    KafkaError._UNSUPPORTED_FEATURE,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.SASL_AUTHENTICATION_FAILED,
}


def classify(err: KafkaError) -> ClientErrorClass:
    if err.fatal():
        return ClientErrorClass.FATAL
    if err.code() in _CONFIGURATION:
        return ClientErrorClass.CONFIGURATION
    if err.code() in _TRANSIENT or err.retriable():
        return ClientErrorClass.TRANSIENT
    return ClientErrorClass.OTHER


def client_id(component: str) -> str:
    return f"sluice-{component}"


def error_callback(component: str, *, repeat_after_s: float = 30.0) -> Callable[[KafkaError], None]:
    """An ``error_cb`` that logs each kind of error once, then at most once per ``repeat_after_s``
    with the number of repeats in between, and counts every one."""
    last: dict[int, tuple[float, int]] = {}
    lock = threading.Lock()

    def on_error(err: KafkaError) -> None:
        kind = classify(err)
        KAFKA_CLIENT_ERRORS.labels(component, kind.value).inc()
        now = time.monotonic()
        with lock:
            seen_at, suppressed = last.get(err.code(), (0.0, -1))
            if suppressed >= 0 and now - seen_at < repeat_after_s:
                last[err.code()] = (seen_at, suppressed + 1)
                return
            last[err.code()] = (now, 0)
        more = f" (+{suppressed} like it)" if suppressed > 0 else ""
        level = logging.WARNING if kind is ClientErrorClass.TRANSIENT else logging.ERROR
        logger.log(level, "kafka %s error in %s: %s%s", kind.value, client_id(component), err.str(), more)

    return on_error


def _common(component: str, on_error: Callable[[KafkaError], None] | None = None) -> dict[str, Any]:
    logged = error_callback(component)
    if on_error is None:
        return {"client.id": client_id(component), "error_cb": logged}

    def both(err: KafkaError) -> None:
        on_error(err)
        logged(err)

    return {"client.id": client_id(component), "error_cb": both}


def producer(kafka: KafkaSettings, component: str, **overrides: Any) -> Producer:
    return Producer({**producer_config(kafka, **overrides), **_common(component)})


def consumer(kafka: KafkaSettings, component: str, group_id: str, **overrides: Any) -> Consumer:
    return Consumer({**consumer_config(kafka, group_id, **overrides), **_common(component)})


def share_consumer(kafka: KafkaSettings, component: str, group_id: str, **overrides: Any) -> ShareConsumer:
    """A share group member (KIP-932): see ``core.kafka.share``."""
    return ShareConsumer({**share_consumer_config(kafka, group_id, **overrides), **_common(component)})


def admin(kafka: KafkaSettings, component: str, *, on_error: Callable[[KafkaError], None] | None = None) -> AdminClient:
    """``on_error`` also sees every client error (to name a refused login in an exception)."""
    return AdminClient({**admin_config(kafka), **_common(component, on_error)})


def serde(settings: Settings) -> Serde:
    """The serializers for the configured Schema Registry (or the local id table)."""
    sr = settings.schema_registry
    return Serde.for_registry(
        sr.url,
        sr.basic_auth_user_info.get_secret_value() if sr.basic_auth_user_info else None,
        config=sr.config,
        auto_register_schemas=sr.auto_register_schemas,
        use_latest_version=sr.use_latest_version,
    )
