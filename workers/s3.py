"""The S3 backend of `workers.storage` (AWS, MinIO, SeaweedFS, any S3-compatible endpoint).

Credentials come from the usual AWS variables/profiles. Writes spool to a local temp file while
hashing, then go up through s3transfer (multipart above 64 MiB, so a multi-GB corpus is never
held in memory); an object exists only once its single PUT or its multipart upload completes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError

from schemas.errors import ArtifactNotFound, StorageError, StorageUnavailable
from workers.storage import CHUNK, HashingWriter, ObjectInfo, Storage, check_key, file_sha256

_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
TRANSFER = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024)


def client_config() -> Config:
    # boto3 >= 1.36 adds CRC checksums that some S3-compatible stores reject: only when required.
    return Config(
        retries={"mode": "standard", "max_attempts": 5},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=5,
        read_timeout=60,
        signature_version="s3v4",
    )


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None) -> None:
        if not bucket:
            raise StorageError("s3:// storage URL needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
            config=client_config(),
        )

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _error(self, exc: Exception, key: str) -> Exception:
        where = f"s3://{self.bucket}/{self.prefix}{key}"
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_CODES:
                return ArtifactNotFound(f"no object {key!r} in {self.url}")
            if code in _CREDENTIAL_CODES:
                return StorageError(
                    f"S3 refused the request for {where} ({code}): check AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY"
                )
            if code == "NoSuchBucket":
                return StorageError(f"S3 bucket {self.bucket!r} does not exist at {self._where()}")
            if code in {"SlowDown", "ServiceUnavailable", "InternalError", "503", "500"}:
                return StorageUnavailable(f"S3 at {self._where()} is unavailable ({code})")
            return StorageError(f"S3 request for {where} failed: {code} {exc}")
        if isinstance(exc, BotoConnectionError):
            return StorageUnavailable(f"cannot reach S3 at {self._where()}: {exc}")
        if isinstance(exc, BotoCoreError):
            return StorageError(f"S3 request for {where} failed: {exc}")
        return exc

    def _where(self) -> str:
        return self.endpoint_url or "AWS"

    @contextmanager
    def _mapped(self, key: str) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, key) from None

    @contextmanager
    def writer(self, key: str) -> Iterator[HashingWriter]:
        s3_key = self._key(key)
        with tempfile.NamedTemporaryFile(prefix="charforge-s3-") as spool:
            out = HashingWriter(spool)
            yield out
            spool.flush()
            self._upload(Path(spool.name), s3_key, out.sha256, key)

    def _upload(self, path: Path, s3_key: str, sha256: str, key: str) -> None:
        with self._mapped(key):
            self._client.upload_file(
                str(path), self.bucket, s3_key,
                ExtraArgs={"Metadata": {"sha256": sha256}}, Config=TRANSFER,
            )

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        sha256 = file_sha256(path)
        self._upload(path, self._key(key), sha256, key)
        return ObjectInfo(key, path.stat().st_size, sha256)

    @contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        with self._mapped(key):
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        try:
            yield _Reader(body, self, key)
        finally:
            body.close()

    @contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        fd, tmp = tempfile.mkstemp(prefix="charforge-s3-")
        os.close(fd)
        try:
            with self._mapped(key):
                self._client.download_file(self.bucket, self._key(key), tmp, Config=TRANSFER)
            yield Path(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _head(self, key: str) -> dict[str, Any]:
        with self._mapped(key):
            return self._client.head_object(Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except ArtifactNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def list(self, prefix: str = "") -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        with self._mapped(prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", []):
                    yield item["Key"][len(self.prefix):]

    def delete(self, key: str) -> None:
        with self._mapped(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def presign(self, key: str, expires: int = 3600) -> str:
        with self._mapped(key):
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires
            )


class _Reader:
    """A streaming body that maps network failures mid-read to storage errors."""

    def __init__(self, body: Any, storage: S3Storage, key: str) -> None:
        self._body, self._storage, self._key = body, storage, key

    def read(self, size: int = -1) -> bytes:
        try:
            return self._body.read(None if size is None or size < 0 else size)
        except (ClientError, BotoCoreError) as exc:
            raise self._storage._error(exc, self._key) from None

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(CHUNK):
            yield chunk

    def readable(self) -> bool:
        return True

