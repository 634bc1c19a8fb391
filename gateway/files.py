"""The file-store seam: batch input, output and error files, and their metadata.

A local directory by default; S3-compatible storage (``s3://bucket/prefix``) when gateways on
several machines share files. Files are streamed both ways: nothing here holds a whole file.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlparse

from pydantic import BaseModel, Field

from core.errors import ConfigError, SluiceError
from core.settings import Settings
from schemas import new_id, utcnow

__all__ = [
    "FileMeta",
    "FileStore",
    "LocalFileStore",
    "S3FileStore",
    "delete_expired",
    "iter_lines",
    "open_file_store",
]

logger = logging.getLogger(__name__)

CHUNK = 1 << 20


class FileMeta(BaseModel):
    """What OpenAI's ``file`` object says about a file, plus its owner."""

    id: str = Field(default_factory=lambda: f"file-{new_id()}")
    tenant: str
    filename: str
    purpose: str
    bytes: int = 0
    lines: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    # OpenAI's expires_after (anchored at created_at); None: kept until deleted.
    expires_at: datetime | None = None

    def expire_after(self, seconds: int | None) -> FileMeta:
        if seconds is not None:
            self.expires_at = self.created_at + timedelta(seconds=seconds)
        return self

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or utcnow())

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created_at.timestamp()),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": int(self.expires_at.timestamp()) if self.expires_at else None,
            "status_details": None,
        }


class FileStore(Protocol):
    def put(self, meta: FileMeta, data: IO[bytes]) -> None:
        """Store ``data`` (read to its end, in chunks), then ``meta``: a reader that counts what
        passes through may update ``meta`` until the data is read."""

    def chunks(self, file_id: str) -> Iterator[bytes]: ...

    def meta(self, file_id: str) -> FileMeta | None: ...

    def list(self, tenant: str | None) -> list[FileMeta]:
        """A tenant's files, newest first (``None``: every tenant's)."""

    def delete(self, file_id: str) -> bool: ...


def delete_expired(store: FileStore, now: datetime | None = None) -> int:
    """Delete every expired file (data and metadata); the gateway runs this now and then, and
    answers 404 for an expired file it has not deleted yet."""
    doomed = [m for m in store.list(None) if m.expired(now)]
    for meta in doomed:
        store.delete(meta.id)
    if doomed:
        logger.info("deleted %d expired file(s)", len(doomed))
    return len(doomed)


def iter_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The non-empty lines of a chunked file, without their line ends."""
    rest = b""
    for chunk in chunks:
        rest += chunk
        *lines, rest = rest.split(b"\n")
        for line in lines:
            if line.strip():
                yield line.rstrip(b"\r")
    if rest.strip():
        yield rest.rstrip(b"\r")


_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def _safe(file_id: str) -> str:
    # Ids are ours (file-<hex>): anything else names no file, and must never reach a path.
    if not file_id or len(file_id) > 128 or not set(file_id) <= _ID_CHARS:
        raise SluiceError(f"invalid file id {file_id!r}")
    return file_id


class LocalFileStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "data").mkdir(parents=True, exist_ok=True)
        (root / "meta").mkdir(parents=True, exist_ok=True)

    def put(self, meta: FileMeta, data: IO[bytes]) -> None:
        path = self.root / "data" / _safe(meta.id)
        tmp = path.with_suffix(".part")
        try:
            with tmp.open("wb") as out:
                shutil.copyfileobj(data, out, CHUNK)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        (self.root / "meta" / f"{meta.id}.json").write_text(meta.model_dump_json())

    def chunks(self, file_id: str) -> Iterator[bytes]:
        with (self.root / "data" / _safe(file_id)).open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def meta(self, file_id: str) -> FileMeta | None:
        try:
            return FileMeta.model_validate_json((self.root / "meta" / f"{_safe(file_id)}.json").read_text())
        except (FileNotFoundError, SluiceError):
            return None

    def list(self, tenant: str | None) -> list[FileMeta]:
        metas = []
        for p in (self.root / "meta").glob("*.json"):
            try:
                metas.append(FileMeta.model_validate_json(p.read_text()))
            except FileNotFoundError:  # deleted meanwhile
                continue
        mine = (m for m in metas if tenant is None or m.tenant == tenant)
        return sorted(mine, key=lambda m: m.created_at, reverse=True)

    def delete(self, file_id: str) -> bool:
        found = False
        for path in (self.root / "data" / _safe(file_id), self.root / "meta" / f"{file_id}.json"):
            try:
                path.unlink()
                found = True
            except FileNotFoundError:
                pass
        return found


class S3FileStore:
    """Any S3-compatible store through boto3 (extra ``s3``): uploads are multipart and streamed."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        try:
            import boto3
        except ImportError as exc:
            raise ConfigError("S3 file storage needs boto3: pip install 'sluice[s3]'") from exc
        u = urlparse(url)
        self.bucket = u.netloc
        self.prefix = u.path.strip("/") + "/" if u.path.strip("/") else ""
        self._s3 = boto3.client(
            "s3",
            endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
            region_name=region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
        )

    def _key(self, kind: str, file_id: str) -> str:
        return f"{self.prefix}{kind}/{_safe(file_id)}"

    def put(self, meta: FileMeta, data: IO[bytes]) -> None:
        try:
            self._s3.upload_fileobj(data, self.bucket, self._key("data", meta.id))
            self._s3.put_object(
                Bucket=self.bucket, Key=self._key("meta", meta.id) + ".json", Body=meta.model_dump_json().encode()
            )
        except Exception as exc:
            raise SluiceError(f"cannot store {meta.id} in s3://{self.bucket}/{self.prefix}: {exc}") from exc

    def chunks(self, file_id: str) -> Iterator[bytes]:
        body = self._s3.get_object(Bucket=self.bucket, Key=self._key("data", file_id))["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def meta(self, file_id: str) -> FileMeta | None:
        try:
            obj = self._s3.get_object(Bucket=self.bucket, Key=self._key("meta", file_id) + ".json")
        except self._s3.exceptions.NoSuchKey:
            return None
        except SluiceError:
            return None
        return FileMeta.model_validate_json(obj["Body"].read())

    def list(self, tenant: str | None) -> list[FileMeta]:
        out = []
        for page in self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}meta/"
        ):
            for item in page.get("Contents", []):
                meta = FileMeta.model_validate_json(
                    self._s3.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
                )
                if tenant is None or meta.tenant == tenant:
                    out.append(meta)
        return sorted(out, key=lambda m: m.created_at, reverse=True)

    def delete(self, file_id: str) -> bool:
        if self.meta(file_id) is None:
            return False
        self._s3.delete_object(Bucket=self.bucket, Key=self._key("data", file_id))
        self._s3.delete_object(Bucket=self.bucket, Key=self._key("meta", file_id) + ".json")
        return True


def open_file_store(settings: Settings) -> FileStore:
    """``SLUICE_FILES__URL``: ``s3://bucket/prefix``, a directory, or (unset) ``<data_dir>/files``."""
    url = settings.files.url
    if url.startswith("s3://"):
        f = settings.files
        return S3FileStore(
            url,
            endpoint_url=f.endpoint_url,
            region=f.region,
            access_key_id=f.access_key_id,
            secret_access_key=f.secret_access_key.get_secret_value() if f.secret_access_key else None,
        )
    return LocalFileStore(Path(url.removeprefix("file://")) if url else settings.data_dir / "files")
