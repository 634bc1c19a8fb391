from __future__ import annotations

import json
from pathlib import Path

import pytest

from analytics.results import openai_batch_line
from core.catalog import load_catalog
from core.errors import CatalogError
from core.kafka_config import consumer_config, producer_config
from core.settings import Settings
from schemas import InferenceResult, utcnow
from sluice.local.stack import child_env


def test_settings_from_env_and_librdkafka_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_KAFKA__BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("SLUICE_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("SLUICE_KAFKA__SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("SLUICE_KAFKA__EXTRA", '{"ssl.ca.location": "/ca.pem"}')
    monkeypatch.setenv("SLUICE_CLICKHOUSE__URL", "http://ch:8123")
    s = Settings()
    p = producer_config(s.kafka)
    assert p["bootstrap.servers"] == "k1:9092,k2:9092"
    assert p["acks"] == "all" and p["enable.idempotence"] is True
    assert p["sasl.mechanism"] == "PLAIN" and p["ssl.ca.location"] == "/ca.pem"
    c = consumer_config(s.kafka, "g")
    assert c["enable.auto.commit"] is False and c["group.id"] == "g"
    assert s.clickhouse_url() == "http://ch:8123"


def test_child_env_round_trips_the_settings_tree(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, topic_prefix="x.")
    s = s.evolve(kafka={"bootstrap_servers": "h:1"}, engine={"kind": "instant"})
    env = child_env(s)
    for k in [k for k in list(__import__("os").environ) if k.startswith("SLUICE_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("SLUICE_"):
            monkeypatch.setenv(k, v)
    assert Settings() == s


def test_packaged_catalog_loads_and_bad_catalogs_fail_clearly(tmp_path: Path) -> None:
    cat = load_catalog()
    assert cat.get("smollm2-135m") is not None
    bad = tmp_path / "c.toml"
    bad.write_text('[[models]]\nname = "a"\nsource = "x"\ntier = 0\n')
    with pytest.raises(CatalogError, match="invalid model catalog"):
        load_catalog(bad)
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "missing.toml")


def test_openai_batch_jsonl_lines() -> None:
    now = utcnow()
    ok = InferenceResult(
        request_id="r1",
        tenant="t",
        priority="low",
        model="m",
        status="succeeded",
        output_text="hi",
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=1,
        created_at=now,
        started_at=now,
        completed_at=now,
    )
    line = json.loads(openai_batch_line(ok))
    assert line["custom_id"] == "r1" and line["error"] is None
    assert line["response"]["body"]["choices"][0]["message"]["content"] == "hi"
    assert line["response"]["body"]["usage"]["total_tokens"] == 4
    bad = ok.model_copy(update={"status": "failed", "error": "context_overflow: too long"})
    assert json.loads(openai_batch_line(bad))["error"] == {
        "code": "context_length_exceeded",
        "message": "context_overflow: too long",
    }
    # The caller's custom_id when the request had one.
    assert json.loads(openai_batch_line(ok.model_copy(update={"custom_id": "mine"})))["custom_id"] == "mine"


def test_a_written_catalog_loads_back(tmp_path: Path) -> None:
    from core.catalog import Catalog, ModelEntry, load_catalog, write_catalog

    catalog = Catalog(
        models=[
            ModelEntry(
                name="a",
                source="builtin:x",
                tier=1,
                context_length=512,
                input_price_per_1m=0.1,
                output_price_per_1m=0.2,
            ),
            ModelEntry(
                name="b.2",
                source="/m/b",
                tier=3,
                context_length=8192,
                input_price_per_1m=1,
                output_price_per_1m=2,
                available=False,
                max_backlog=10,
            ),
        ]
    )
    assert load_catalog(write_catalog(catalog, tmp_path / "c.toml")) == catalog


def test_every_kafka_client_gets_a_client_id_and_an_error_callback(monkeypatch: pytest.MonkeyPatch) -> None:
    from core import clients
    from core.settings import KafkaSettings

    built: list[dict[str, object]] = []
    for name in ("Producer", "Consumer", "AdminClient"):
        monkeypatch.setattr(clients, name, lambda conf: built.append(conf) or conf)
    kafka = KafkaSettings(extra={"compression.type": "lz4"})
    clients.producer(kafka, "router")
    clients.consumer(kafka, "gpu-tiny", "g1")
    clients.admin(kafka, "admin")
    assert [c["client.id"] for c in built] == ["sluice-router", "sluice-gpu-tiny", "sluice-admin"]
    assert all(callable(c["error_cb"]) for c in built)
    assert built[1]["group.id"] == "g1" and built[1]["enable.auto.commit"] is False


def test_client_errors_are_classified_and_repeats_are_not_logged_again(caplog: pytest.LogCaptureFixture) -> None:
    from confluent_kafka import KafkaError

    from core.clients import ClientErrorClass, classify, error_callback

    assert classify(KafkaError(KafkaError._TRANSPORT, "down")) is ClientErrorClass.TRANSIENT
    assert classify(KafkaError(KafkaError._AUTHENTICATION, "bad")) is ClientErrorClass.CONFIGURATION
    assert classify(KafkaError(KafkaError._FATAL, "fenced", fatal=True)) is ClientErrorClass.FATAL
    on_error = error_callback("test-component", repeat_after_s=3600)
    with caplog.at_level("WARNING", logger="core.clients"):
        for _ in range(50):
            on_error(KafkaError(KafkaError._TRANSPORT, "connection refused"))
        on_error(KafkaError(KafkaError._AUTHENTICATION, "bad credentials"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "transient" in lines[0] and "sluice-test-component" in lines[0]
    assert "configuration" in lines[1] and caplog.records[1].levelname == "ERROR"


def test_engines_come_from_one_registry_that_settings_validate_against(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from core.engines import engine_names
    from core.settings import EngineSettings
    from gpu_consumers.engine import create_engine
    from gpu_consumers.instant_engine import InstantTestEngine
    from tests.support import model_entry

    assert {"vllm", "instant"} <= set(engine_names())
    with pytest.raises(ValidationError, match="known engines: instant, vllm"):
        EngineSettings(kind="nonsense")
    engine = create_engine(EngineSettings(kind="instant"), model_entry("m"), tmp_path)
    assert isinstance(engine, InstantTestEngine) and engine.name == "m"


def test_the_router_app_takes_a_classifier(tmp_path: Path) -> None:
    from schemas import InferenceRequest
    from stream_processors.app import create_app
    from stream_processors.classifier import Classification
    from tests.support import model_entry

    class Fixed:
        def classify(self, request: InferenceRequest) -> Classification:
            return Classification(
                task_type="custom", estimated_input_tokens=1, required_tier=1, required_context=10, reason="fixed"
            )

    from core.catalog import Catalog

    classifier = Fixed()
    app = create_app(Settings(data_dir=tmp_path), Catalog(models=[model_entry("m")]), classifier=classifier)
    assert app.pipeline.router.classifier is classifier


def test_a_local_stack_starts_a_broker_only_when_none_is_configured(tmp_path: Path) -> None:
    from sluice.local.stack import LocalStack

    assert LocalStack(Settings(data_dir=tmp_path)).embedded_broker is True
    configured = Settings(data_dir=tmp_path)
    configured = configured.evolve(kafka={"bootstrap_servers": "kafka.internal:9092"})
    assert LocalStack(configured).embedded_broker is False
    # An explicit choice (sluice up --external-kafka, or not) still wins.
    assert LocalStack(configured, embedded_broker=True).embedded_broker is True


def test_the_router_publishes_through_faust_on_durable_tansu_unless_told_otherwise(tmp_path: Path) -> None:
    from sluice.local.stack import LocalStack

    settings = Settings(data_dir=tmp_path)
    assert settings.processor.producer == "librdkafka"
    assert LocalStack(settings, durable=True, broker="tansu").settings.processor.producer == "faust"
    assert LocalStack(settings, durable=False, broker="tansu").settings.processor.producer == "librdkafka"
    # A broker the stack does not start is not known to be tansu.
    external = settings.evolve(kafka={"bootstrap_servers": "kafka.internal:9092"})
    assert LocalStack(external, durable=True, broker="tansu").settings.processor.producer == "librdkafka"
    chosen = settings.evolve(processor={"producer": "librdkafka"})
    assert LocalStack(chosen, durable=True, broker="tansu").settings.processor.producer == "librdkafka"


def test_the_router_producer_setting_names_the_choices(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from core.catalog import Catalog
    from stream_processors.app import create_app
    from stream_processors.sender import KafkaSender
    from tests.support import model_entry

    with pytest.raises(ValidationError, match="librdkafka, faust"):
        Settings(data_dir=tmp_path, processor={"producer": "aiokafka"})
    faust_app = create_app(
        Settings(data_dir=tmp_path, processor={"producer": "faust"}), Catalog(models=[model_entry("m")])
    )
    assert faust_app.sender is None
    default_app = create_app(Settings(data_dir=tmp_path / "b"), Catalog(models=[model_entry("m")]))
    assert isinstance(default_app.sender, KafkaSender)
