"""S3 / MinIO access through the minio SDK, with one retry policy: exponential backoff on transient
failures (connection errors, 5xx, throttling), an immediate one-line error naming the bucket and
key on permanent ones (no such bucket or key, access denied, bad credentials)."""

from __future__ import annotations

import hashlib
import os
import queue
import random
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from disp_store.errors import TransientError, UserInputError

T = TypeVar("T")

# Multipart part size: large enough for few requests on multi-GB shards, small enough to stream.
PART_SIZE = 16 * 2**20
DOWNLOAD_CHUNK = 4 * 2**20
PERMANENT_CODES = {"NoSuchBucket", "NoSuchKey", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                   "InvalidBucketName", "AllAccessDisabled", "NoSuchUpload", "InvalidArgument"}
MISSING_CODES = ("NoSuchKey", "NoSuchObject", "ResourceNotFound")  # the object (not the bucket) is not there
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                   "ServiceUnavailable", "RequestTimeTooSkewed", "OperationAborted"}


class StoreError(UserInputError):
    """A permanent storage failure (no such bucket or key, access denied, corrupt object), naming
    bucket/key: retrying cannot help."""


class StoreUnavailableError(TransientError):
    """Transient storage failures that outlasted the retry budget: a later attempt may succeed."""


# A socket read that waits this long for a byte has met a server that is not answering: retried, but
# only TIMEOUT_ATTEMPTS times in all, so an endpoint that accepts connections and never answers
# fails the stage (exit 75) within minutes, not after attempts x read timeout.
READ_TIMEOUT_SECONDS = 60.0
TIMEOUT_ATTEMPTS = 2


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # first try included
    base_delay: float = 0.5  # seconds; doubles each retry, with jitter
    max_delay: float = 20.0
    timeout_attempts: int = TIMEOUT_ATTEMPTS  # of those, how many may end in a read timeout

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2 ** attempt) * (0.5 + random.random() / 2)


def _tls_failure(exc: BaseException) -> bool:
    """A failed TLS handshake (plain HTTP on the other end, an unknown certificate authority): a
    setting to fix, not something a retry mends."""
    reason = getattr(exc, "reason", None)
    return isinstance(exc, (urllib3.exceptions.SSLError, ssl.SSLError)) or \
        isinstance(reason, (urllib3.exceptions.SSLError, ssl.SSLError))


def is_transient(exc: BaseException) -> bool:
    if _tls_failure(exc):
        return False
    if isinstance(exc, S3Error):
        return exc.code in TRANSIENT_CODES or (exc.code not in PERMANENT_CODES and exc.response is not None
                                               and exc.response.status >= 500)
    if isinstance(exc, ServerError):  # a 5xx without an S3 error body
        return True
    if isinstance(exc, InvalidResponseError):
        return getattr(exc, "_code", 500) >= 500
    return isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


def _timed_out(exc: BaseException) -> bool:
    """A server that took the connection and then did not answer in time (a refused connection,
    which urllib3 also files under its timeouts, is not one)."""
    def waited(error: BaseException | None) -> bool:
        return isinstance(error, (urllib3.exceptions.ReadTimeoutError, TimeoutError)) and \
            not isinstance(error, urllib3.exceptions.NewConnectionError)

    return waited(exc) or waited(getattr(exc, "reason", None))


def _not_s3(exc: BaseException) -> bool:
    """The SDK could not read the answer as S3's XML: whatever listens there is not S3 (a web page,
    a proxy's login form)."""
    import xml.etree.ElementTree as ElementTree

    return isinstance(exc, ElementTree.ParseError) or (isinstance(exc, ValueError) and "XML" in str(exc))


def describe(exc: BaseException) -> str:
    if _tls_failure(exc):
        return ("TLS handshake failed (a plain-HTTP endpoint needs spec.storage.secure: false; "
                "a private certificate authority must be trusted by the runner)")
    if isinstance(exc, S3Error):
        return f"{exc.code}: {exc.message}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


class S3Store:
    """Objects in S3-compatible storage (MinIO in the cluster)."""

    def __init__(self, endpoint: str, access_key: str | None, secret_key: str | None, secure: bool = True,
                 region: str | None = None, retry: RetryPolicy = RetryPolicy(),
                 sleep: Callable[[float], None] = time.sleep, read_timeout: float = READ_TIMEOUT_SECONDS):
        # The SDK's own HTTP retries are off: this class decides what is worth retrying.
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=10, read=read_timeout),
                                   retries=urllib3.Retry(total=0, connect=0, read=0, redirect=0, status=0),
                                   maxsize=10)
        try:
            self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region,
                                http_client=http)
        except ValueError as exc:  # e.g. a scheme or a path in the endpoint
            raise StoreError(f"S3 endpoint {endpoint!r}: {exc} (give host[:port])") from None
        self.retry = retry
        self.sleep = sleep
        self.endpoint = endpoint
        self.read_timeout = read_timeout

    def _call(self, what: str, bucket: str, key: str, fn: Callable[[], T]) -> T:
        import xml.etree.ElementTree as ElementTree

        where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
        timeouts = 0
        for attempt in range(self.retry.attempts):
            try:
                return fn()
            except (ValueError, ElementTree.ParseError) as exc:  # the SDK's own checks, or an answer it cannot read
                if _not_s3(exc):
                    raise StoreError(f"spec.storage.endpoint {self.endpoint}: the server there does not answer as "
                                     f"S3 does ({what} {where} got no S3 XML; is it an S3/MinIO endpoint?)") from None
                raise StoreError(f"{what} {where}: {exc}") from None
            except (S3Error, ServerError, InvalidResponseError, urllib3.exceptions.HTTPError, ConnectionError,
                    TimeoutError) as exc:
                if not is_transient(exc):
                    raise StoreError(f"{what} {where}: {describe(exc)}") from None
                timeouts += _timed_out(exc)
                if attempt + 1 == self.retry.attempts or timeouts >= self.retry.timeout_attempts:
                    detail = (f"no answer within {self.read_timeout:g} s, {timeouts} times" if _timed_out(exc)
                              else describe(exc))
                    raise StoreUnavailableError(f"{what} {where}: still failing after {attempt + 1} attempts "
                                                f"({detail}) at {self.endpoint}") from None
                self.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    def upload_file(self, path: Path, bucket: str, key: str) -> str:
        """Stream a local file to an object (multipart above PART_SIZE); returns the ETag."""
        result = self._call("upload to", bucket, key, lambda: self.client.fput_object(
            bucket, key, str(path), part_size=PART_SIZE, num_parallel_uploads=1))
        return result.etag

    def download_file(self, bucket: str, key: str, path: Path, sha256: str | None = None) -> None:
        """Stream an object to `path` in 4 MiB chunks (never whole in memory). With `sha256`, the
        chunks are hashed on a second thread as they arrive (hashlib releases the GIL), and a
        mismatch fails naming the key and leaves no file behind."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")

        def fetch() -> str | None:
            hasher = _BackgroundSha256() if sha256 is not None else None
            try:
                response = self.client.get_object(bucket, key)
                try:
                    with open(tmp, "wb") as handle:
                        for chunk in response.stream(DOWNLOAD_CHUNK):
                            handle.write(chunk)
                            if hasher is not None:
                                hasher.update(chunk)
                finally:
                    response.close()
                    response.release_conn()
            except BaseException:
                if hasher is not None:
                    hasher.hexdigest()  # stops its thread; the attempt's digest is discarded
                raise
            return hasher.hexdigest() if hasher is not None else None

        actual = self._call("download of", bucket, key, fetch)
        if sha256 is not None and actual != sha256:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"s3://{bucket}/{key}: checksum mismatch (expected sha256 {sha256[:12]}…, "
                             f"got {actual[:12]}…); the object changed or is corrupt")
        os.replace(tmp, path)

    def sha256(self, bucket: str, key: str) -> str:
        """The object's SHA-256, streamed in 4 MiB chunks (never whole in memory, nothing written)."""

        def digest() -> str:
            hasher = hashlib.sha256()
            response = self.client.get_object(bucket, key)
            try:
                for chunk in response.stream(DOWNLOAD_CHUNK):
                    hasher.update(chunk)
            finally:
                response.close()
                response.release_conn()
            return hasher.hexdigest()

        return self._call("read of", bucket, key, digest)

    def _read(self, bucket: str, key: str, missing_ok: bool) -> bytes | None:
        def read() -> bytes | None:
            try:
                response = self.client.get_object(bucket, key)
            except S3Error as exc:
                if missing_ok and exc.code in MISSING_CODES:
                    return None
                raise
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call("read of", bucket, key, read)

    def get_bytes(self, bucket: str, key: str) -> bytes:
        return self._read(bucket, key, missing_ok=False)

    def get_bytes_or_none(self, bucket: str, key: str) -> bytes | None:
        """The object's bytes, None when there is no such object."""
        return self._read(bucket, key, missing_ok=True)

    def put_bytes(self, bucket: str, key: str, data: bytes) -> None:
        import io

        self._call("write of", bucket, key, lambda: self.client.put_object(bucket, key, io.BytesIO(data), len(data)))

    def put_conditionally(self, bucket: str, key: str, data: bytes, if_match: str | None = None) -> str | None:
        """Write an object only if no object has the key (or, with `if_match`, only if the one there
        still has that ETag): S3's conditional writes, which MinIO and AWS S3 honour. The new ETag,
        or None when the condition failed. (The SDK's put_object cannot send these headers, so this
        goes through its single-request PUT.)"""
        headers = {"Content-Type": "application/json"}
        headers.update({"If-Match": f'"{if_match}"'} if if_match else {"If-None-Match": "*"})

        def put() -> str | None:
            try:
                return self.client._put_object(bucket, key, data, headers=headers).etag  # noqa: SLF001
            except S3Error as exc:
                if exc.code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                    return None
                raise

        return self._call("conditional write of", bucket, key, put)

    def exists(self, bucket: str, key: str) -> bool:
        return self.etag_or_none(bucket, key) is not None

    def etag(self, bucket: str, key: str) -> str:
        return self._call("lookup of", bucket, key, lambda: self.client.stat_object(bucket, key).etag)

    def list(self, bucket: str, prefix: str) -> Iterator[tuple[str, int, str]]:
        """(key, size, etag) of every object under `prefix`."""
        objects = self._call("listing of", bucket, prefix,
                             lambda: list(self.client.list_objects(bucket, prefix=prefix, recursive=True)))
        for obj in objects:
            yield obj.object_name, obj.size, obj.etag

    def remove(self, bucket: str, keys: list[str]) -> None:
        """Delete objects (missing ones are no error), in the SDK's batches of up to 1000."""
        from minio.deleteobjects import DeleteObject

        def delete() -> None:
            errors = list(self.client.remove_objects(bucket, [DeleteObject(k) for k in keys]))
            if errors:
                raise StoreError(f"delete in s3://{bucket}: {errors[0].code} on {errors[0].name}")

        if keys:
            self._call("delete in", bucket, keys[0], delete)

    def check_bucket(self, bucket: str, prefix: str = "") -> None:
        """Fail at once, naming the bucket, when it is missing; and naming the endpoint when what
        answers there is not S3 (a bucket lookup is a bare HEAD any web server answers: a listing
        needs S3's XML). The listing stays under `prefix`, where credentials limited to the run's
        prefix may list."""
        if not self._call("lookup of", bucket, "", lambda: self.client.bucket_exists(bucket)):
            raise StoreError(f"s3://{bucket}: no such bucket at {self.endpoint}")
        self._call("listing of", bucket, prefix,
                   lambda: next(iter(self.client.list_objects(bucket, prefix=prefix or None)), None))

    def etag_or_none(self, bucket: str, key: str) -> str | None:
        """The object's ETag, None when there is no such object."""
        def stat() -> str | None:
            try:
                return self.client.stat_object(bucket, key).etag
            except S3Error as exc:
                if exc.code in MISSING_CODES:
                    return None
                raise

        return self._call("lookup of", bucket, key, stat)


class _BackgroundSha256:
    """SHA-256 computed on a worker thread from a bounded queue of chunks (at most 4 in flight)."""

    def __init__(self):
        self._digest = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._digest.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self._digest.hexdigest()
