"""One set of settings, every client: the librdkafka dicts and the router's Faust/aiokafka
credentials for each security protocol, field by field."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from faust.auth import OAuthCredentials, SASLCredentials, SSLCredentials
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from core.kafka_config import admin_config, consumer_config, producer_config
from core.settings import KafkaSettings, Settings
from stream_processors.security import OidcTokenProvider, faust_credentials
from tests.tls_certs import Certs, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _kafka(**kw: Any) -> KafkaSettings:
    return KafkaSettings.model_validate({"bootstrap_servers": "b1:9093,b2:9093", **kw})


def _security(conf: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in conf.items() if k.startswith(("security.", "ssl.", "sasl."))}


def test_plaintext(certs: Certs) -> None:
    kafka = _kafka()
    assert _security(producer_config(kafka)) == {"security.protocol": "PLAINTEXT"}
    assert faust_credentials(kafka) is None
    assert credentials_to_aiokafka_auth(faust_credentials(kafka)) == {"security_protocol": "PLAINTEXT"}


def test_tls_with_a_ca_and_a_client_certificate(certs: Certs) -> None:
    kafka = _kafka(
        security_protocol="ssl",
        ssl_ca_location=str(certs.ca),
        ssl_certificate_location=str(certs.client_cert),
        ssl_key_location=str(certs.client_key),
    )
    expected = {
        "security.protocol": "SSL",
        "ssl.endpoint.identification.algorithm": "https",
        "ssl.ca.location": str(certs.ca),
        "ssl.certificate.location": str(certs.client_cert),
        "ssl.key.location": str(certs.client_key),
    }
    for conf in (producer_config(kafka), consumer_config(kafka, "g"), admin_config(kafka)):
        assert _security(conf) == expected
    creds = faust_credentials(kafka)
    assert isinstance(creds, SSLCredentials)
    auth = credentials_to_aiokafka_auth(creds)
    assert auth["security_protocol"] == "SSL"
    ctx: ssl.SSLContext = auth["ssl_context"]
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "sluice test CA"),),)]


def test_sasl_plain_over_plaintext() -> None:
    kafka = _kafka(security_protocol="SASL_PLAINTEXT", sasl_mechanism="plain", sasl_username="u", sasl_password="p")
    assert _security(consumer_config(kafka, "g")) == {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "u",
        "sasl.password": "p",
    }
    auth = credentials_to_aiokafka_auth(faust_credentials(kafka))
    assert auth == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "u",
        "sasl_plain_password": "p",
        "ssl_context": None,
    }


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_scram_over_tls_the_confluent_cloud_shape(mechanism: str, certs: Certs) -> None:
    kafka = _kafka(
        security_protocol="SASL_SSL",
        sasl_mechanism=mechanism,
        sasl_username="key",
        sasl_password="secret",
        ssl_ca_location=str(certs.ca),
    )
    assert _security(producer_config(kafka)) == {
        "security.protocol": "SASL_SSL",
        "ssl.endpoint.identification.algorithm": "https",
        "ssl.ca.location": str(certs.ca),
        "sasl.mechanism": mechanism,
        "sasl.username": "key",
        "sasl.password": "secret",
    }
    creds = faust_credentials(kafka)
    assert isinstance(creds, SASLCredentials)
    auth = credentials_to_aiokafka_auth(creds)
    # Before: SASL credentials without a TLS context, i.e. SASL_PLAINTEXT against a TLS cluster.
    assert auth["security_protocol"] == "SASL_SSL" and auth["sasl_mechanism"] == mechanism
    assert isinstance(auth["ssl_context"], ssl.SSLContext)
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("key", "secret")


def test_oauthbearer_through_an_oidc_token_endpoint(certs: Certs) -> None:
    kafka = _kafka(
        security_protocol="SASL_SSL",
        sasl_mechanism="OAUTHBEARER",
        sasl_oauthbearer_token_endpoint_url="https://idp.example.com/token",
        sasl_oauthbearer_client_id="sluice",
        sasl_oauthbearer_client_secret="s3cret",
        sasl_oauthbearer_scope="kafka",
    )
    assert _security(consumer_config(kafka, "g")) == {
        "security.protocol": "SASL_SSL",
        "ssl.endpoint.identification.algorithm": "https",
        "sasl.mechanism": "OAUTHBEARER",
        "sasl.oauthbearer.method": "oidc",
        "sasl.oauthbearer.token.endpoint.url": "https://idp.example.com/token",
        "sasl.oauthbearer.client.id": "sluice",
        "sasl.oauthbearer.client.secret": "s3cret",
        "sasl.oauthbearer.scope": "kafka",
    }
    creds = faust_credentials(kafka)
    assert isinstance(creds, OAuthCredentials) and isinstance(creds.oauth_cb, OidcTokenProvider)
    auth = credentials_to_aiokafka_auth(creds)
    assert auth["security_protocol"] == "SASL_SSL" and auth["sasl_mechanism"] == "OAUTHBEARER"
    assert creds.oauth_cb.url == "https://idp.example.com/token" and creds.oauth_cb.scope == "kafka"


def test_host_name_checking_can_be_turned_off(certs: Certs) -> None:
    kafka = _kafka(security_protocol="SSL", ssl_endpoint_identification_algorithm="none")
    assert producer_config(kafka)["ssl.endpoint.identification.algorithm"] == "none"
    assert not credentials_to_aiokafka_auth(faust_credentials(kafka))["ssl_context"].check_hostname


def test_unknown_protocols_and_mechanisms_are_refused() -> None:
    with pytest.raises(ValueError, match="security_protocol"):
        _kafka(security_protocol="TLS")
    with pytest.raises(ValueError, match="sasl_mechanism"):
        _kafka(sasl_mechanism="KERBEROS5")


def test_extra_properties_are_applied_last() -> None:
    kafka = _kafka(extra={"compression.type": "lz4", "auto.offset.reset": "latest", "linger.ms": "50"})
    assert producer_config(kafka)["compression.type"] == "lz4"
    assert producer_config(kafka, **{"linger.ms": 2})["linger.ms"] == "50"
    assert consumer_config(kafka, "g")["auto.offset.reset"] == "latest"


def test_compression_is_a_setting_zstd_by_default() -> None:
    assert producer_config(_kafka())["compression.type"] == "zstd"
    assert producer_config(_kafka(compression_type="none"))["compression.type"] == "none"


def test_the_router_compresses_and_authenticates_like_the_other_clients(tmp_path: Path, certs: Certs) -> None:
    from stream_processors.app import create_app

    settings = Settings(data_dir=tmp_path)
    settings = settings.evolve(
        kafka={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "u",
            "ssl_ca_location": str(certs.ca),
        }
    )
    app = create_app(settings)
    assert app.conf.producer_compression_type == "zstd"
    creds = app.conf.broker_credentials
    assert isinstance(creds, SASLCredentials) and creds.ssl_context is not None
    assert str(creds.mechanism.value) == "SCRAM-SHA-512"
