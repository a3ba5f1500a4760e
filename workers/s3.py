"""The S3 backend of `workers.storage` (AWS, MinIO, SeaweedFS, any S3-compatible endpoint).

Credentials come from the usual AWS variables/profiles. Writes spool to a local temp file while
hashing, then go up through s3transfer (multipart above 64 MiB, parts read from the file as they
are sent, so a multi-GB corpus is never held in memory); an object exists only once its single
PUT or its multipart upload completes.

Failures map to `schemas.errors`: bad credentials or a missing bucket are a `StorageError` that
says what to fix; an endpoint that cannot be reached is a `StorageUnavailable` (retryable), raised
after botocore's few quick retries rather than minutes later: the dispatcher's stage retries are
the place for longer waits (docs/deployment.md).
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from schemas.errors import ArtifactNotFound, StorageError, StorageUnavailable
from workers.storage import (
    CHUNK,
    HashingWriter,
    ObjectInfo,
    Storage,
    check_key,
    check_prefix,
    file_sha256,
)

_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken",
    "ExpiredToken", "InvalidClientTokenId",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_UNAVAILABLE_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                      "500", "502", "503", "504"}
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
TRANSFER = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=64 * 1024 * 1024)


def client_config() -> Config:
    # boto3 >= 1.36 adds CRC checksums that some S3-compatible stores reject: only when required.
    # AWS_MAX_ATTEMPTS is the standard AWS variable; an explicit Config would otherwise hide it.
    attempts = os.environ.get("AWS_MAX_ATTEMPTS", "5")
    if not attempts.isdigit() or int(attempts) < 1:
        raise StorageError(f"AWS_MAX_ATTEMPTS must be a positive integer, not {attempts!r}")
    return Config(
        retries={"mode": "standard", "max_attempts": int(attempts)},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=5,
        read_timeout=30,
        signature_version="s3v4",
    )


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None) -> None:
        if not bucket:
            raise StorageError("s3:// storage URL needs a bucket: s3://bucket/prefix")
        if not _BUCKET.match(bucket):
            raise StorageError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        self._bucket_seen = False
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
            config=client_config(),
        )

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _where(self) -> str:
        return self.endpoint_url or "AWS"

    def _error(self, exc: BaseException, key: str) -> BaseException:
        """The `schemas.errors` exception for a boto3/botocore failure about `key`."""
        if isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
            return self._error(exc.__context__, key)  # boto3 wraps the ClientError it caught
        if isinstance(exc, RetriesExceededError):
            return self._error(exc.last_exception, key)
        if isinstance(exc, ClientError):
            return self._client_error(exc, key)
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(
                f"no usable S3 credentials for {self.url}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            )
        if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
            return StorageUnavailable(f"cannot reach S3 at {self._where()}: {exc}")
        if isinstance(exc, BotoCoreError):
            return StorageError(f"S3 request for {self._full(key)} failed: {exc}")
        return exc

    def _full(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _client_error(self, exc: ClientError, key: str) -> Exception:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return self._no_bucket()
        if code in _MISSING_CODES:
            # A HEAD has no body, so a missing bucket is a bare 404 too: tell the two apart once.
            if not self._bucket_exists():
                return self._no_bucket()
            return ArtifactNotFound(f"no object {key!r} in {self.url}")
        if code in _CREDENTIAL_CODES:
            return StorageError(
                f"S3 refused the request for {self._full(key)} ({code}): check AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY"
            )
        if code in _UNAVAILABLE_CODES:
            return StorageUnavailable(f"S3 at {self._where()} is unavailable ({code})")
        return StorageError(f"S3 request for {self._full(key)} failed: {code} {exc}")

    def _no_bucket(self) -> StorageError:
        return StorageError(
            f"S3 bucket {self.bucket!r} does not exist at {self._where()}: create it or fix "
            "CHARFORGE_STORAGE_URL"
        )

    def _bucket_exists(self) -> bool:
        if self._bucket_seen:
            return True
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            # e.g. 403: the bucket may be there, and the original error says more than a guess would
            return str(exc.response.get("Error", {}).get("Code", "")) not in {"404", "NoSuchBucket"}
        except BotoCoreError:
            return True
        self._bucket_seen = True
        return True

    @contextmanager
    def _mapped(self, key: str) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError, S3UploadFailedError, RetriesExceededError) as exc:
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
            # Buffered like a local file: read(n), readline() and line iteration behave the same.
            yield io.BufferedReader(_Body(body, self, key), CHUNK)
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
        check_prefix(prefix)
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


class _Body(io.RawIOBase):
    """A streaming GET body that maps network failures mid-read to storage errors."""

    def __init__(self, body: Any, storage: S3Storage, key: str) -> None:
        self._body, self._storage, self._key = body, storage, key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._body.read(len(buffer))
        except (ClientError, BotoCoreError) as exc:
            raise self._storage._error(exc, self._key) from None
        buffer[: len(data)] = data
        return len(data)
