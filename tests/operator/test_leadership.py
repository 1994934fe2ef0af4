"""Leader election's rule (client-go's), without a cluster: who may write the Lease when. The
calls themselves run against the real API server in tests/e2e/test_leadership.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from disp_operator.config import ConfigError, LeaderElectionConfig
from disp_operator.leadership import LeaseState, Move, decide

NOW = datetime(2026, 12, 6, 12, 0, 0, tzinfo=timezone.utc)


def lease(holder: str, renewed_ago: float | None, duration: int = 15) -> LeaseState:
    renewed = None if renewed_ago is None else NOW - timedelta(seconds=renewed_ago)
    return LeaseState(holder=holder, renewed=renewed, duration_seconds=duration, transitions=3, resource_version="7")


@pytest.mark.parametrize("state, move", [
    (None, Move.CREATE),
    (lease("me", 1), Move.RENEW),
    (lease("me", 60), Move.RENEW),  # ours even if late: renewing is how a slow leader keeps it
    (lease("other", 1), Move.WAIT),
    (lease("other", 14.9), Move.WAIT),
    (lease("other", 15), Move.TAKE_OVER),  # not renewed within leaseDurationSeconds
    (lease("", 1), Move.TAKE_OVER),  # released
    (lease("other", None), Move.TAKE_OVER),  # never renewed: nothing says it is alive
])
def test_who_may_write_the_lease(state, move):
    assert decide(state, "me", NOW) is move


def test_the_lease_is_read_as_the_api_server_writes_it():
    state = LeaseState.from_wire({"metadata": {"resourceVersion": "42"}, "spec": {
        "holderIdentity": "disp-operator-7d9f_1a2b3c4d", "leaseDurationSeconds": 15, "leaseTransitions": 2,
        "acquireTime": "2026-12-06T11:59:00.000000Z", "renewTime": "2026-12-06T11:59:58.250000Z"}})
    assert state == LeaseState("disp-operator-7d9f_1a2b3c4d", NOW - timedelta(seconds=1.75), 15, 2, "42")
    assert LeaseState.from_wire({"metadata": {"resourceVersion": "1"}, "spec": {}}).holder == ""


def test_leader_election_settings_come_from_the_environment_and_must_be_consistent(monkeypatch):
    monkeypatch.delenv("DISP_LEADER_ELECTION", raising=False)
    assert LeaderElectionConfig.from_env() is None
    monkeypatch.setenv("DISP_LEADER_ELECTION", "true")
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    with pytest.raises(ConfigError, match="POD_NAMESPACE"):
        LeaderElectionConfig.from_env()
    monkeypatch.setenv("POD_NAMESPACE", "disp-system")
    assert LeaderElectionConfig.from_env() == LeaderElectionConfig(namespace="disp-system")
    monkeypatch.setenv("DISP_LEADER_RENEW_DEADLINE_SECONDS", "20")  # longer than the lease: two could lead
    with pytest.raises(ConfigError, match="must hold"):
        LeaderElectionConfig.from_env()
