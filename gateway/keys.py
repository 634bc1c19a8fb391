"""API keys: each maps to one tenant. Only a SHA-256 of a key is stored; the key itself is shown
once, when it is created. The tenant of every gateway call comes from its key, never from the body."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.settings import Settings
from schemas import utcnow

__all__ = ["KeyInfo", "KeyStore", "hash_key", "key_id", "keys_path"]

_PREFIX = "sk-sluice-"


def keys_path(settings: Settings) -> Path:
    """``SLUICE_GATEWAY__KEYS_PATH``, or ``<data_dir>/api_keys.json``."""
    return settings.gateway.keys_path or settings.data_dir / "api_keys.json"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key: str) -> str:
    """A key's public id: ``key_`` and the first 16 hex digits of its hash (never the key)."""
    return "key_" + hash_key(key)[:16]


@dataclass(frozen=True)
class KeyInfo:
    """What a key grants: its tenant, and its own service-tier mapping and wait limit, if any."""

    tenant: str
    service_tiers: dict[str, str] = field(default_factory=dict)
    max_wait_s: float | None = None
    # Most tokens (prompt estimate + max_tokens) this key's requests may have queued or running.
    token_quota: int | None = None
    # A stable, non-secret id of the key (a prefix of its hash): what the quota ledger counts by.
    key_id: str = ""


class KeyStore:
    """Hashed keys in a JSON file (mode 0600), re-read when it changes, so keys created with
    ``sluice keys create`` work in a running gateway without a restart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._keys: dict[str, dict[str, Any]] = {}

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return {}
        with self._lock:
            if mtime != self._mtime:
                try:
                    self._keys = json.loads(self.path.read_text() or "{}")
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"API key file {self.path} is not JSON: {exc}") from exc
                self._mtime = mtime
            return self._keys

    def tenant_for(self, key: str) -> str | None:
        info = self.info(key)
        return info.tenant if info else None

    def info(self, key: str) -> KeyInfo | None:
        entry = self._load().get(hash_key(key))
        if entry is None:
            return None
        return KeyInfo(
            entry["tenant"],
            dict(entry.get("service_tiers", {})),
            entry.get("max_wait_s"),
            entry.get("token_quota"),
            key_id(key),
        )

    def create(
        self,
        tenant: str,
        *,
        name: str = "",
        service_tiers: dict[str, str] | None = None,
        max_wait_s: float | None = None,
        token_quota: int | None = None,
    ) -> str:
        """A new key for ``tenant``; the only time the key is ever returned. ``service_tiers``
        (tier -> high|normal|low) and ``max_wait_s`` override the gateway's for this key."""
        if not tenant or len(tenant) > 128:
            raise ConfigError("a tenant name is 1 to 128 characters")
        bad = {t: p for t, p in (service_tiers or {}).items() if p not in ("high", "normal", "low")}
        if bad:
            raise ConfigError(f"service tiers must map to high, normal or low: {bad}")
        if max_wait_s is not None and max_wait_s <= 0:
            raise ConfigError("max_wait_s must be positive")
        if token_quota is not None and token_quota <= 0:
            raise ConfigError("token_quota must be positive")
        key = _PREFIX + secrets.token_urlsafe(32)
        entry: dict[str, Any] = {"tenant": tenant, "name": name, "created_at": utcnow().isoformat()}
        if service_tiers:
            entry["service_tiers"] = dict(service_tiers)
        if max_wait_s is not None:
            entry["max_wait_s"] = max_wait_s
        if token_quota is not None:
            entry["token_quota"] = token_quota
        with self._lock:
            keys = json.loads(self.path.read_text() or "{}") if self.path.exists() else {}
            keys[hash_key(key)] = entry
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(keys, f, indent=1)
            os.replace(tmp, self.path)
            self._mtime = None
        return key

    def tenants(self) -> dict[str, int]:
        """Keys per tenant (never the keys)."""
        out: dict[str, int] = {}
        for entry in self._load().values():
            out[entry["tenant"]] = out.get(entry["tenant"], 0) + 1
        return out
