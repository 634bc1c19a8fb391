"""The router's connection security: the same ``KafkaSettings`` as every librdkafka client,
mapped onto Faust's credentials (aiokafka underneath): TLS with a CA and client certificates,
SASL PLAIN and SCRAM over plaintext or TLS, and OAUTHBEARER through an OIDC token endpoint."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

from aiokafka.conn import AbstractTokenProvider
from faust.auth import OAuthCredentials, SASLCredentials, SSLCredentials

from core.errors import ConfigError
from core.settings import KafkaSettings, secret

__all__ = ["OidcTokenProvider", "faust_credentials", "ssl_context"]

logger = logging.getLogger(__name__)


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context for ``SSL`` and ``SASL_SSL``: the configured CA (else the system's), a
    client certificate for mutual TLS, host-name checking unless turned off."""
    if not kafka.uses_tls:
        return None
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=kafka.ssl_ca_location)
        if kafka.ssl_certificate_location:
            ctx.load_cert_chain(
                kafka.ssl_certificate_location, kafka.ssl_key_location, password=secret(kafka.ssl_key_password)
            )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot build the TLS context for Kafka: {exc}") from exc
    if kafka.ssl_endpoint_identification_algorithm.lower() == "none":
        ctx.check_hostname = False
    return ctx


class OidcTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """OAuth 2 client-credentials tokens for SASL/OAUTHBEARER, as librdkafka's
    ``sasl.oauthbearer.method=oidc`` gets them; cached until a minute before they expire."""

    def __init__(self, url: str, client_id: str, client_secret: str, scope: str | None = None) -> None:
        self.url, self.client_id, self.client_secret, self.scope = url, client_id, client_secret, scope
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        import httpx

        async with self._lock:
            if self._token is None or time.monotonic() > self._expires:
                data = {"grant_type": "client_credentials"}
                if self.scope:
                    data["scope"] = self.scope
                async with httpx.AsyncClient(timeout=30) as http:
                    resp = await http.post(self.url, data=data, auth=(self.client_id, self.client_secret))
                resp.raise_for_status()
                body: dict[str, Any] = resp.json()
                self._token = str(body["access_token"])
                self._expires = time.monotonic() + max(0.0, float(body.get("expires_in", 300)) - 60)
            return self._token


def faust_credentials(kafka: KafkaSettings) -> Any:
    """Faust credentials for ``kafka`` (None for PLAINTEXT)."""
    ctx = ssl_context(kafka)
    if kafka.uses_sasl:
        mechanism = kafka.sasl_mechanism or "PLAIN"
        if mechanism == "OAUTHBEARER":
            if not kafka.sasl_oauthbearer_token_endpoint_url:
                raise ConfigError("OAUTHBEARER needs SLUICE_KAFKA__SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL")
            provider = OidcTokenProvider(
                kafka.sasl_oauthbearer_token_endpoint_url,
                kafka.sasl_oauthbearer_client_id or "",
                secret(kafka.sasl_oauthbearer_client_secret) or "",
                kafka.sasl_oauthbearer_scope,
            )
            return OAuthCredentials(oauth_cb=provider, ssl_context=ctx)
        return SASLCredentials(
            username=kafka.sasl_username,
            password=secret(kafka.sasl_password) or "",
            ssl_context=ctx,
            mechanism=mechanism,
        )
    if ctx is not None:
        return SSLCredentials(ctx)
    return None
