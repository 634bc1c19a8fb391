"""The whole pipeline on Apache Kafka's own secured listeners, from the one set of
``SLUICE_KAFKA__*`` settings: SSL requiring client certificates (mutual TLS), and SASL_SSL with
SCRAM-SHA-512 users. The router (Faust/aiokafka), the GPU consumer, the producer, the admin
client, the ClickHouse sink and the gateway all connect through it; a client without a
certificate or with a wrong password is refused with the broker's reason.

With ``SLUICE_TEST_BROKER=tansu`` (which has no TLS listener of its own: tansu 0.6 accepts
``--cert`` but serves plaintext) the TLS test runs through a TLS-terminating proxy instead."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from confluent_kafka import KafkaException

from analytics.store import Store
from core import clients
from core.errors import BrokerError
from core.settings import Settings
from core.topics import ensure_topics
from gateway.keys import KeyStore, keys_path
from producers import SluiceClient
from sluice.local.kafka import KafkaCluster
from sluice.local.stack import LocalStack
from tests.integration.conftest import SCRAM_USER, TEST_BROKER
from tests.integration.helpers import result_counts
from tests.support import wait_until
from tests.tls_certs import Certs, make_certs

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]


@pytest.fixture
def tls_settings(settings: Settings, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Settings]:
    if TEST_BROKER == "kafka":
        cluster: KafkaCluster = request.getfixturevalue("kafka_cluster")
        certs: Certs = request.getfixturevalue("kafka_certs")
        servers = cluster.ssl_bootstrap_servers
        proxy = broker = None
    else:
        from sluice.local.broker import EmbeddedBroker, free_port
        from tests.tls_proxy import TlsProxy

        certs = make_certs(tmp_path / "certs")
        proxy_port = free_port()
        broker = EmbeddedBroker(log_path=tmp_path / "tansu-tls.log", advertised_port=proxy_port).start()
        proxy = TlsProxy(proxy_port, broker.port, certs.server_cert, certs.server_key, client_ca=certs.ca).start()
        servers = f"127.0.0.1:{proxy_port}"
    yield settings.evolve(
        kafka={
            "bootstrap_servers": servers,
            "security_protocol": "SSL",
            "ssl_ca_location": str(certs.ca),
            "ssl_certificate_location": str(certs.client_cert),
            "ssl_key_location": str(certs.client_key),
        }
    )
    if proxy is not None and broker is not None:
        proxy.stop()
        broker.stop()


@pytest.fixture
def sasl_settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    if TEST_BROKER != "kafka":
        pytest.skip("SASL needs Apache Kafka (tansu has no SASL)")
    cluster: KafkaCluster = request.getfixturevalue("kafka_cluster")
    certs: Certs = request.getfixturevalue("kafka_certs")
    return settings.evolve(
        kafka={
            "bootstrap_servers": cluster.sasl_ssl_bootstrap_servers,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": SCRAM_USER.name,
            "sasl_password": SCRAM_USER.password,
            "ssl_ca_location": str(certs.ca),
        }
    )


def _run_pipeline(settings: Settings, store: Store, *, through_gateway: bool) -> None:
    stack = LocalStack(settings, store=store, run_gateway=through_gateway).start()
    try:
        assert stack.broker is None  # the configured cluster, not an embedded broker
        with SluiceClient(settings) as client:
            ids = [client.submit(f"secured {i}", max_tokens=3) for i in range(10)]
        if through_gateway:
            key = KeyStore(keys_path(stack.settings)).create("secure-tenant")
            with httpx.Client(base_url=f"{stack.gateway_url}/v1", headers={"Authorization": f"Bearer {key}"}) as c:
                resp = c.post(
                    "/async/chat/completions",
                    json={"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "via http"}]},
                    timeout=30,
                )
                assert resp.status_code == 202, resp.text
                ids.append(resp.json()["id"])
        counts = wait_until(
            lambda: result_counts(store, ids), lambda c: len(c) == len(ids), timeout=120, what="results"
        )
        assert set(counts) == set(ids)
    finally:
        stack.stop()


def test_the_pipeline_runs_on_a_mutual_tls_cluster(tls_settings: Settings, clickhouse_store: Store) -> None:
    _run_pipeline(tls_settings, clickhouse_store, through_gateway=False)


def test_a_client_without_a_certificate_is_refused(tls_settings: Settings) -> None:
    plain = tls_settings.evolve(kafka={"ssl_certificate_location": None, "ssl_key_location": None})
    with pytest.raises(KafkaException):
        clients.admin(plain.kafka, "test").list_topics(timeout=5)


def test_the_pipeline_and_the_gateway_run_on_sasl_ssl_scram(sasl_settings: Settings, clickhouse_store: Store) -> None:
    _run_pipeline(sasl_settings, clickhouse_store, through_gateway=True)


def test_a_wrong_password_is_refused_with_the_brokers_reason(sasl_settings: Settings) -> None:
    wrong = sasl_settings.evolve(kafka={"sasl_password": "not-the-password"})
    with pytest.raises(BrokerError, match=r"(?i)authentication"):
        ensure_topics(wrong.kafka, {f"{wrong.topic_prefix}never": {}}, timeout=10)
