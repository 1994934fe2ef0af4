"""An exclusive lease on a stage output of an S3-backed run: the S3 counterpart of the local
`output_lock`, for processes that share only the bucket (two pods, or a pod and a person running
`disp run` against the same prefix).

The lease is an object beside the output (`<stage>.lease`: holder and expiry) created with S3's
conditional write (If-None-Match: *), so of two processes exactly one creates it. The holder
renews it (If-Match on its own ETag) every third of its time to live, so the lease of a process
that was killed lapses within one TTL; the holder deletes it when it is done. A process that finds
a lease held by another waits until it expires (at most one TTL): unrenewed, it was a killed
holder's (an OOM-killed or evicted pod, the case of every retried stage), and the waiting process
takes it over; renewed, its holder is alive, and the waiting process gets a TransientError (exit
75): the operator retries later, a person is told who holds it and until when."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Callable

from disp_store.errors import TransientError, UserInputError
from disp_store.s3 import S3Store

logger = logging.getLogger(__name__)
LEASE_SUFFIX = ".lease"
DEFAULT_TTL_SECONDS = 60.0
TTL_ENV = "DISP_LEASE_TTL_SECONDS"  # how long a killed holder's lease blocks the next attempt


def lease_ttl() -> float:
    """The lease time to live: $DISP_LEASE_TTL_SECONDS, else 60 s."""
    raw = os.environ.get(TTL_ENV, "").strip()
    if not raw:
        return DEFAULT_TTL_SECONDS
    try:
        ttl = float(raw)
    except ValueError:
        ttl = -1.0
    if not 1.0 <= ttl <= 3600.0:
        raise UserInputError(f"{TTL_ENV}={raw[:20]!r}: expected seconds between 1 and 3600")
    return ttl


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


class S3Lease:
    def __init__(self, store: S3Store, bucket: str, key: str, ttl: float | None = None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep):
        self.store, self.bucket, self.key, self.clock, self.sleep = store, bucket, key, clock, sleep
        self.ttl = lease_ttl() if ttl is None else ttl
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
        self._etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"holder": self.holder, "expiresAt": self.clock() + self.ttl}).encode()

    def acquire(self) -> None:
        # The lease may be released between the failed create and the reads of it (its holder just
        # finished): then the create is simply tried again.
        for _ in range(3):
            if self._try_acquire():
                break
        else:
            raise TransientError(f"s3://{self.bucket}/{self.key}: other processes keep taking and releasing this "
                                 "lease; run again when they have finished")
        self._renewer = threading.Thread(target=self._renew, name="s3-lease", daemon=True)
        self._renewer.start()

    def _try_acquire(self) -> bool:
        """True once this process holds the lease; False when it vanished while being looked at."""
        where = f"s3://{self.bucket}/{self.key}"
        self._etag = self.store.put_conditionally(self.bucket, self.key, self._record())
        if self._etag is None:  # someone holds, or held, the lease
            current_etag = self.store.etag_or_none(self.bucket, self.key)
            raw = self.store.get_bytes_or_none(self.bucket, self.key) if current_etag is not None else None
            if raw is None:
                return False  # released meanwhile
            try:
                current = json.loads(raw)
                holder, expires = str(current["holder"]), float(current["expiresAt"])
            except (ValueError, KeyError, TypeError):
                holder, expires = "an unknown process", 0.0  # unreadable: treat as lapsed
            if expires > self.clock():
                busy = TransientError(f"{where}: this output is being built by {holder} (lease until "
                                      f"{_iso(expires)}); run again when it has finished")
                wait = expires - self.clock() + 1.0
                if wait > self.ttl + 1.0:
                    raise busy  # not a lease this runner wrote: do not wait on it
                logger.warning("%s: held by %s until %s; waiting for it to lapse (a killed attempt's?)",
                               where, holder, _iso(expires))
                self.sleep(wait)
                now_etag = self.store.etag_or_none(self.bucket, self.key)
                if now_etag is None:
                    return False  # released meanwhile
                if now_etag != current_etag:
                    raise busy  # renewed (or released and retaken) meanwhile: its holder is alive
            self._etag = self.store.put_conditionally(self.bucket, self.key, self._record(), if_match=current_etag)
            if self._etag is None:
                raise TransientError(f"{where}: another process took over the lapsed lease of {holder} just now; "
                                     "run again when it has finished")
            logger.warning("%s: took over the lapsed lease of %s", where, holder)
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                etag = self.store.put_conditionally(self.bucket, self.key, self._record(), if_match=self._etag)
            except Exception as exc:  # noqa: BLE001 - a renewal that fails now may succeed next time
                logger.warning("s3://%s/%s: lease not renewed: %s", self.bucket, self.key, exc)
                continue
            if etag is None:
                logger.warning("s3://%s/%s: lease lost to another process", self.bucket, self.key)
                return
            self._etag = etag

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(10)
        try:
            self.store.remove(self.bucket, [self.key])
        except Exception as exc:  # noqa: BLE001 - it lapses by itself within one TTL
            logger.warning("s3://%s/%s: lease not removed (it lapses by itself): %s", self.bucket, self.key, exc)

    def __enter__(self) -> "S3Lease":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
