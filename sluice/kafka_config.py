"""The one place that assembles librdkafka configuration dicts from Settings."""

from __future__ import annotations

from typing import Any

from sluice.settings import KafkaSettings

__all__ = ["admin_config", "common_config", "consumer_config", "producer_config"]


def common_config(kafka: KafkaSettings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "security.protocol": kafka.security_protocol,
    }
    if kafka.sasl_mechanism:
        conf["sasl.mechanism"] = kafka.sasl_mechanism
    if kafka.sasl_username is not None:
        conf["sasl.username"] = kafka.sasl_username
    if kafka.sasl_password is not None:
        conf["sasl.password"] = kafka.sasl_password
    conf.update(kafka.extra)
    return conf


def producer_config(kafka: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """Durable by default: every acknowledged message is on all in-sync replicas, once."""
    conf = common_config(kafka)
    conf.update(
        {
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": kafka.linger_ms,
            "compression.type": "none",
        }
    )
    conf.update(overrides)
    return conf


def consumer_config(kafka: KafkaSettings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """Manual commits only: offsets move after the work they cover is acknowledged downstream."""
    conf = common_config(kafka)
    conf.update(
        {
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": kafka.fetch_wait_max_ms,
            "session.timeout.ms": kafka.session_timeout_ms,
            "heartbeat.interval.ms": kafka.heartbeat_interval_ms,
            "max.poll.interval.ms": kafka.max_poll_interval_ms,
            "partition.assignment.strategy": "cooperative-sticky",
        }
    )
    conf.update(overrides)
    return conf


def admin_config(kafka: KafkaSettings) -> dict[str, Any]:
    return common_config(kafka)
