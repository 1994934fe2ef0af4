"""Leader election on a coordination.k8s.io Lease, so that the chart can run two replicas: one
leads (reconciles, creates stage Jobs, exports job metrics), the other waits and takes over when the
leader stops renewing. The rules are client-go's (k8s.io/client-go/tools/leaderelection), so the
Lease reads the same to `kubectl get lease` and to any tool that knows them:

- a Lease nobody holds, or whose holder has not renewed it within leaseDurationSeconds, may be
  taken; every write (a merge patch, or the create of a Lease that is not there) carries the
  resourceVersion it read, so of two candidates exactly one wins;
- the leader renews every `retry` seconds and gives up leading when it could not renew for
  `renew_deadline` seconds (shorter than the duration, so it stops before another may take over);
- a leader that stops cleanly releases the Lease (an empty holder), so the other takes over at once.

`decide` is the pure rule; `LeaderElector` makes the calls."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

from kubernetes.client.exceptions import ApiException

log = logging.getLogger("disp_operator.leadership")


class Move(str, Enum):
    CREATE = "create"  # no Lease yet
    RENEW = "renew"  # ours
    TAKE_OVER = "take over"  # free, or its holder stopped renewing
    WAIT = "wait"  # another replica leads


@dataclass(frozen=True)
class LeaseState:
    """What the Lease says, as read."""

    holder: str
    renewed: Optional[datetime]
    duration_seconds: int
    transitions: int
    resource_version: str

    @classmethod
    def from_wire(cls, lease: dict[str, Any]) -> "LeaseState":
        spec = lease.get("spec") or {}
        renewed = spec.get("renewTime") or spec.get("acquireTime")
        return cls(holder=spec.get("holderIdentity") or "",
                   renewed=datetime.fromisoformat(renewed.replace("Z", "+00:00")) if renewed else None,
                   duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
                   transitions=int(spec.get("leaseTransitions") or 0),
                   resource_version=lease["metadata"]["resourceVersion"])


def decide(lease: Optional[LeaseState], me: str, now: datetime) -> Move:
    if lease is None:
        return Move.CREATE
    if lease.holder == me:
        return Move.RENEW
    expired = lease.renewed is None or now >= lease.renewed + timedelta(seconds=lease.duration_seconds)
    return Move.TAKE_OVER if not lease.holder or expired else Move.WAIT


def _micro_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def identity() -> str:
    """This replica's name in the Lease: its pod's name and a per-process suffix (a restarted
    container is a new candidate, never mistaken for the leader it was)."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


@dataclass
class LeaderElector:
    """One candidate. `campaign` returns once this replica leads; `keep` then renews until the
    lease is lost (it calls `on_lost` and returns) or it is cancelled (it releases the Lease)."""

    coordination: Any  # kubernetes.client.CoordinationV1Api
    namespace: str
    name: str
    me: str
    duration: float = 15.0
    renew_deadline: float = 10.0
    retry: float = 2.0
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)
    leading: bool = False

    def _read(self) -> Optional[LeaseState]:
        try:
            raw = self.coordination.read_namespaced_lease(self.name, self.namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return LeaseState.from_wire(json.loads(raw.data))

    def _body(self, now: datetime, transitions: int, resource_version: Optional[str]) -> dict[str, Any]:
        """The whole Lease as a new holder writes it."""
        spec: dict[str, Any] = {"holderIdentity": self.me, "leaseDurationSeconds": int(round(self.duration)),
                                "acquireTime": _micro_time(now), "renewTime": _micro_time(now),
                                "leaseTransitions": transitions}
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if resource_version:
            metadata["resourceVersion"] = resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}

    def try_acquire_or_renew(self) -> bool:
        """One round of the rule; True when this replica holds the Lease afterwards. A conflict
        (another wrote first) is a lost round, not an error."""
        lease, now = self._read(), self.clock()
        move = decide(lease, self.me, now)
        try:
            if move is Move.CREATE:
                self.coordination.create_namespaced_lease(self.namespace, self._body(now, 0, None))
            elif move is Move.RENEW:  # a merge patch that names the resourceVersion it read
                assert lease is not None
                self.coordination.patch_namespaced_lease(self.name, self.namespace, {
                    "metadata": {"resourceVersion": lease.resource_version},
                    "spec": {"renewTime": _micro_time(now), "holderIdentity": self.me}})
            elif move is Move.TAKE_OVER:  # the whole spec anew, on the resourceVersion it read
                assert lease is not None
                body = self._body(now, lease.transitions + 1, lease.resource_version)
                self.coordination.patch_namespaced_lease(self.name, self.namespace,
                                                         {"metadata": body["metadata"], "spec": body["spec"]})
            else:
                return False
        except ApiException as exc:
            if exc.status == 409:  # another candidate wrote (or created it) first
                return False
            raise
        return True

    async def campaign(self) -> None:
        while True:
            try:
                if await asyncio.to_thread(self.try_acquire_or_renew):
                    self.leading = True
                    log.info("leading (Lease %s/%s as %s)", self.namespace, self.name, self.me)
                    return
            except ApiException as exc:
                log.warning("Lease %s/%s not readable: %s %s", self.namespace, self.name, exc.status, exc.reason)
            await asyncio.sleep(self.retry)

    async def keep(self, on_lost: Callable[[], None]) -> None:
        last_renewed = time.monotonic()
        try:
            while True:
                await asyncio.sleep(self.retry)
                try:
                    renewed = await asyncio.to_thread(self.try_acquire_or_renew)
                except ApiException as exc:
                    log.warning("Lease renewal failed: %s %s", exc.status, exc.reason)
                    renewed = False
                except Exception as exc:  # the API server unreachable: counts against the deadline
                    log.warning("Lease renewal failed: %s", exc)
                    renewed = False
                if renewed:
                    last_renewed = time.monotonic()
                elif time.monotonic() - last_renewed >= self.renew_deadline:
                    self.leading = False
                    log.error("lost the Lease %s/%s (not renewed for %.0f s): stopping", self.namespace,
                              self.name, self.renew_deadline)
                    on_lost()
                    return
        except asyncio.CancelledError:
            if self.leading:
                await asyncio.to_thread(self.release)
            raise

    def release(self) -> None:
        """Hand the Lease back (an empty holder, a duration of 1 s) so the other replica need not
        wait for it to expire; nothing happens if another holds it by now."""
        self.leading = False
        try:
            lease = self._read()
            if lease is None or lease.holder != self.me:
                return
            self.coordination.patch_namespaced_lease(self.name, self.namespace, {
                "metadata": {"resourceVersion": lease.resource_version},
                "spec": {"holderIdentity": None, "leaseDurationSeconds": 1}})
            log.info("released the Lease %s/%s", self.namespace, self.name)
        except ApiException as exc:
            log.warning("Lease not released (%s %s): the other replica takes over when it expires",
                        exc.status, exc.reason)


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b'{"standby": true}'
        self.send_response(200 if self.path.split("?")[0] == "/healthz" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:  # probes every few seconds: not worth a log line
        pass


def serve_standby_health(port: int) -> ThreadingHTTPServer:
    """/healthz while this replica waits to lead: kopf serves the liveness endpoint only once the
    operator runs, and a waiting replica is alive. Shut it down before kopf binds the port."""
    server = ThreadingHTTPServer(("0.0.0.0", port), _Healthy)
    threading.Thread(target=server.serve_forever, name="standby /healthz", daemon=True).start()
    return server
