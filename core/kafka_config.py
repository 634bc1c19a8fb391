"""The one place that assembles librdkafka configuration dicts from Settings.

Order: the connection (security) settings, then Sluice's defaults for the client kind, then the
caller's overrides, and ``KafkaSettings.extra`` last, so a user's property always wins.
"""

from __future__ import annotations

from typing import Any

from core.settings import KafkaSettings, secret

__all__ = [
    "admin_config",
    "common_config",
    "consumer_config",
    "producer_config",
    "security_config",
    "share_consumer_config",
]


def security_config(kafka: KafkaSettings) -> dict[str, Any]:
    """``security.protocol`` and the TLS and SASL properties it needs."""
    conf: dict[str, Any] = {"security.protocol": kafka.security_protocol}
    if kafka.uses_tls:
        conf["ssl.endpoint.identification.algorithm"] = kafka.ssl_endpoint_identification_algorithm
        for key, value in (
            ("ssl.ca.location", kafka.ssl_ca_location),
            ("ssl.certificate.location", kafka.ssl_certificate_location),
            ("ssl.key.location", kafka.ssl_key_location),
            ("ssl.key.password", secret(kafka.ssl_key_password)),
        ):
            if value is not None:
                conf[key] = value
    if kafka.uses_sasl:
        mechanism = kafka.sasl_mechanism or "PLAIN"
        conf["sasl.mechanism"] = mechanism
        if mechanism == "OAUTHBEARER":
            if kafka.sasl_oauthbearer_token_endpoint_url:
                conf["sasl.oauthbearer.method"] = "oidc"
                conf["sasl.oauthbearer.token.endpoint.url"] = kafka.sasl_oauthbearer_token_endpoint_url
                conf["sasl.oauthbearer.client.id"] = kafka.sasl_oauthbearer_client_id or ""
                conf["sasl.oauthbearer.client.secret"] = secret(kafka.sasl_oauthbearer_client_secret) or ""
                if kafka.sasl_oauthbearer_scope:
                    conf["sasl.oauthbearer.scope"] = kafka.sasl_oauthbearer_scope
        else:
            if kafka.sasl_username is not None:
                conf["sasl.username"] = kafka.sasl_username
            if kafka.sasl_password is not None:
                conf["sasl.password"] = kafka.sasl_password.get_secret_value()
    return conf


def common_config(kafka: KafkaSettings) -> dict[str, Any]:
    return {"bootstrap.servers": kafka.bootstrap_servers, **security_config(kafka)}


def producer_config(kafka: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """Durable by default: every acknowledged message is on all in-sync replicas, once."""
    conf = common_config(kafka)
    conf.update(
        {
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": kafka.linger_ms,
            "compression.type": kafka.compression_type,
            # Kafka's Java partitioner (librdkafka's default is CRC32): a key lands on the same
            # partition whichever client wrote it, which is what co-partitions a request with its
            # dedupe-table entry (core.placement).
            "partitioner": "murmur2_random",
        }
    )
    conf.update(overrides)
    conf.update(kafka.extra)
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
    conf.update(kafka.extra)
    return conf


def share_consumer_config(kafka: KafkaSettings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """A share group member (KIP-932) that acknowledges each record itself."""
    conf = common_config(kafka)
    conf.update({"group.id": group_id, "share.acknowledgement.mode": "explicit"})
    conf.update(overrides)
    conf.update(kafka.extra)
    return conf


def admin_config(kafka: KafkaSettings) -> dict[str, Any]:
    return {**common_config(kafka), **kafka.extra}
