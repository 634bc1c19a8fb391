"""One fixture per service, started once per session: Apache Kafka from local jars (or tansu with
``SLUICE_TEST_BROKER=tansu``, or any cluster named by ``SLUICE_TEST_KAFKA``), chDB through
clickhouse-connect (or a server named by ``SLUICE_TEST_CLICKHOUSE``); testcontainers where a
Docker engine answers. Each test gets its own topic prefix, consumer groups and data directory."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from analytics.store import Store
from core.catalog import Catalog, ModelEntry, write_catalog
from core.settings import Settings
from schemas import Serde
from sluice.local.kafka import KafkaCluster, KafkaTls, ScramUser
from sluice.local.stack import LocalStack
from tests.support import unavailable
from tests.tls_certs import Certs, make_certs


def _docker_available() -> bool:
    if os.environ.get("SLUICE_TEST_NO_DOCKER"):
        return False
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


# Which broker the integration tier runs on: "kafka" (Apache Kafka from the jars bootstrap
# installs; what CI runs) or "tansu" (the embedded broker of `sluice up`).
TEST_BROKER = os.environ.get("SLUICE_TEST_BROKER", "kafka").lower()
SCRAM_USER = ScramUser("sluice-test", "sluice-test-secret")


@pytest.fixture(scope="session")
def kafka_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("kafka-certs"))


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory, kafka_certs: Certs) -> Iterator[KafkaCluster]:
    """One local Apache Kafka node for the session, with a PLAINTEXT listener, an SSL listener
    that requires client certificates and a SASL_SSL listener with a SCRAM-SHA-512 user."""
    if TEST_BROKER != "kafka":
        pytest.skip(f"SLUICE_TEST_BROKER={TEST_BROKER}: the Apache Kafka tests need SLUICE_TEST_BROKER=kafka")
    from core.errors import SluiceError

    certs = kafka_certs
    cluster = KafkaCluster(
        tmp_path_factory.mktemp("kafka"),
        tls=KafkaTls(certs.ca, certs.server_cert, certs.server_key),
        scram_users=[SCRAM_USER],
    )
    try:
        cluster.start()
    except SluiceError as exc:
        unavailable("Apache Kafka", exc)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("SLUICE_TEST_KAFKA")
    if external:
        yield external
        return
    if TEST_BROKER == "kafka":
        cluster: KafkaCluster = request.getfixturevalue("kafka_cluster")
        yield cluster.bootstrap_servers
        return
    if _docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("confluentinc/cp-kafka:7.7.1").with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
        return
    from core.errors import BrokerError
    from sluice.local.broker import EmbeddedBroker

    try:
        broker = EmbeddedBroker(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log").start()
    except BrokerError as exc:
        unavailable("Kafka broker (tansu)", exc)
    yield broker.bootstrap_servers
    broker.stop()


@pytest.fixture(scope="session")
def clickhouse_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    url = os.environ.get("SLUICE_TEST_CLICKHOUSE")
    container = None
    if not url and _docker_available():
        from testcontainers.clickhouse import ClickHouseContainer

        container = ClickHouseContainer("clickhouse/clickhouse-server:25.8").start()
        url = f"http://{container.get_container_host_ip()}:{container.get_exposed_port(8123)}"
    if not url:
        # chDB allows one data directory per process: the whole session shares this one.
        url = f"chdb://{tmp_path_factory.mktemp('chdb')}"
    try:
        store = Store(url, "sluice", password=os.environ.get("SLUICE_TEST_CLICKHOUSE_PASSWORD", "test"))
        store.ensure_schema()
    except Exception as exc:
        unavailable("ClickHouse", exc)
    yield store
    store.close()
    if container is not None:
        container.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight model the real-engine tests run on (built once per session)."""
    from sluice.local.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def embedding_model_dir() -> Path:
    """all-MiniLM-L6-v2 from the semantic extra (skipped locally without it, a failure in CI)."""
    try:
        from stream_processors.embedding import default_model_path

        return default_model_path()
    except Exception as exc:
        unavailable("the semantic cache's embedding model", exc)


@pytest.fixture
def catalog(make_entry: Callable[..., ModelEntry]) -> Catalog:
    return Catalog(
        models=[
            make_entry("tiny", tier=1, context_length=1024, input_price_per_1m=0.1, output_price_per_1m=0.2),
            make_entry("big", tier=3, context_length=8192, input_price_per_1m=1.0, output_price_per_1m=2.0),
        ]
    )


@pytest.fixture
def settings(tmp_path: Path, kafka_bootstrap: str, clickhouse_store: Store, catalog: Catalog) -> Settings:
    catalog_path = write_catalog(catalog, tmp_path / "catalog.toml")
    s = Settings(
        data_dir=tmp_path / "data",
        topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
        catalog_path=catalog_path,
    )
    return s.evolve(
        kafka={"bootstrap_servers": kafka_bootstrap},
        # A small engine: 8 requests at a time, so backlogs form and priorities matter.
        engine={"kind": "instant", "max_inflight": 8},
        # `sluice stats` reads the hourly rollup: refreshed often, so tests wait seconds, not a minute.
        clickhouse={"url": clickhouse_store.url, "sink_flush_ms": 200, "rollup_interval_s": 0.5},
        retry={"backoff_ms": [200, 400]},
    )


@pytest.fixture
def serde() -> Serde:
    return Serde()


@pytest.fixture
def make_stack(settings: Settings, clickhouse_store: Store) -> Iterator[Callable[..., LocalStack]]:
    """Start the local stack (embedded broker per test, the session's ClickHouse) with changed
    settings: ``make_stack(engine={"instant_token_seconds": 0.05})`` (as for ``Settings.evolve``)."""
    started: list[LocalStack] = []

    def make(**changes: Any) -> LocalStack:
        stack = LocalStack(settings.evolve(**changes), store=clickhouse_store)
        started.append(stack)
        return stack.start()

    yield make
    for stack in started:
        stack.stop()


@pytest.fixture
def stack(make_stack: Callable[..., LocalStack]) -> LocalStack:
    return make_stack()
