from __future__ import annotations

import json
from pathlib import Path

import pytest

from analytics.results import openai_batch_line
from schemas import InferenceResult, utcnow
from sluice.catalog import load_catalog
from sluice.errors import CatalogError
from sluice.kafka_config import consumer_config, producer_config
from sluice.local.stack import child_env
from sluice.settings import Settings


def test_settings_from_env_and_librdkafka_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_KAFKA__BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
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
    s.kafka.bootstrap_servers = "h:1"
    s.engine.kind = "instant"
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
        "code": "context_overflow",
        "message": "too long",
    }


def test_a_written_catalog_loads_back(tmp_path: Path) -> None:
    from sluice.catalog import Catalog, ModelEntry, load_catalog, write_catalog

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
