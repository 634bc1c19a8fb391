"""The whole pipeline on a TLS-only cluster with client certificates (mutual TLS): the router
(Faust/aiokafka), the GPU consumer, the producer, the admin client and the ClickHouse sink
(librdkafka) all connect with the one set of ``SLUICE_KAFKA__*`` settings.

The embedded broker has no TLS listener of its own (tansu 0.6 accepts ``--cert`` but serves
plaintext), so TLS is terminated by a proxy in front of it; the broker advertises the proxy, so no
client ever reaches it in plaintext."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaException

from analytics.store import Store
from producers import SluiceClient
from sluice import clients
from sluice.local.broker import EmbeddedBroker, free_port
from sluice.local.stack import LocalStack
from sluice.settings import Settings
from tests.integration.helpers import result_counts
from tests.support import wait_until
from tests.tls_certs import make_certs
from tests.tls_proxy import TlsProxy

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


@pytest.fixture
def tls_settings(settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    certs = make_certs(tmp_path / "certs")
    proxy_port = free_port()
    broker = EmbeddedBroker(log_path=tmp_path / "tansu-tls.log", advertised_port=proxy_port).start()
    proxy = TlsProxy(proxy_port, broker.port, certs.server_cert, certs.server_key, client_ca=certs.ca).start()
    k = settings.kafka
    k.bootstrap_servers = f"127.0.0.1:{proxy_port}"
    k.security_protocol = "SSL"
    k.ssl_ca_location = str(certs.ca)
    k.ssl_certificate_location = str(certs.client_cert)
    k.ssl_key_location = str(certs.client_key)
    yield settings
    proxy.stop()
    broker.stop()


def test_the_pipeline_runs_on_a_mutual_tls_cluster(tls_settings: Settings, clickhouse_store: Store) -> None:
    stack = LocalStack(tls_settings, store=clickhouse_store).start()
    try:
        assert stack.broker is None  # the configured cluster, not an embedded broker
        with SluiceClient(tls_settings) as client:
            ids = [client.submit(f"over tls {i}", max_tokens=3) for i in range(10)]
        counts = wait_until(
            lambda: result_counts(clickhouse_store, ids), lambda c: len(c) == len(ids), timeout=120, what="results"
        )
        assert set(counts) == set(ids)
    finally:
        stack.stop()


def test_a_client_without_a_certificate_is_refused(tls_settings: Settings) -> None:
    plain = tls_settings.model_copy(deep=True)
    plain.kafka.ssl_certificate_location = None
    plain.kafka.ssl_key_location = None
    with pytest.raises(KafkaException):
        clients.admin(plain.kafka, "test").list_topics(timeout=5)
