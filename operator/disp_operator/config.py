"""The operator's own settings, from its environment (the Helm chart sets them). Read once, at startup."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

from disp_api import LogFormat, SecretKeyRef, StorageSpec

from disp_operator.jobs import RunnerDefaults
from disp_operator.reconcile import PENDING_THRESHOLD, RetryBackoff


class ConfigError(ValueError):
    pass


def _number(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a number") from None
    if value < minimum:
        raise ConfigError(f"{name}: {value} is below the minimum {minimum}")
    return value


def _optional_number(name: str, minimum: float) -> Optional[float]:
    """A number at least `minimum`, or None when the variable is unset or empty."""
    return _number(name, 0.0, minimum) if os.environ.get(name, "").strip() else None


def _json(name: str, default: Any, kind: type) -> Any:
    """A JSON value (the chart renders node selectors and tolerations with toJson)."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except ValueError:
        raise ConfigError(f"{name}: not JSON: {raw[:80]!r}") from None
    if not isinstance(value, kind):
        raise ConfigError(f"{name}: expected a JSON {kind.__name__}, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class LeaderElectionConfig:
    """Where the replicas meet (a Lease in the operator's own namespace) and client-go's timings:
    a leader that has not renewed for `lease_seconds` may be replaced; it stops leading itself
    after `renew_deadline_seconds` without a renewal; candidates retry every `retry_seconds`."""

    namespace: str
    lease_name: str = "disp-operator"
    lease_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_seconds: float = 2.0

    @classmethod
    def from_env(cls) -> Optional["LeaderElectionConfig"]:
        if not _flag("DISP_LEADER_ELECTION"):
            return None
        namespace = os.environ.get("POD_NAMESPACE", "").strip()
        if not namespace:
            raise ConfigError("POD_NAMESPACE: required with DISP_LEADER_ELECTION=true (the namespace of the Lease; "
                              "the chart sets it from the pod's own)")
        config = cls(namespace=namespace, lease_name=os.environ.get("DISP_LEADER_LEASE_NAME") or "disp-operator",
                     lease_seconds=_number("DISP_LEADER_LEASE_SECONDS", 15.0, 1.0),
                     renew_deadline_seconds=_number("DISP_LEADER_RENEW_DEADLINE_SECONDS", 10.0, 0.5),
                     retry_seconds=_number("DISP_LEADER_RETRY_SECONDS", 2.0, 0.1))
        if not config.retry_seconds < config.renew_deadline_seconds < config.lease_seconds:
            raise ConfigError("DISP_LEADER_RETRY_SECONDS < DISP_LEADER_RENEW_DEADLINE_SECONDS < "
                              "DISP_LEADER_LEASE_SECONDS must hold (a leader must stop before another may take over)")
        return config


@dataclass(frozen=True)
class OperatorConfig:
    runner: RunnerDefaults = field(default_factory=RunnerDefaults)
    backoff: RetryBackoff = field(default_factory=RetryBackoff)
    metrics_port: int = 9090  # 0: no metrics server
    reconcile_interval: float = 10.0  # seconds between passes when nothing wakes a job earlier
    progress_interval: float = 10.0  # seconds between reads of a running job's progress.json
    default_storage: Optional[StorageSpec] = None  # for jobs without spec.storage (the chart's MinIO)
    pending_threshold: timedelta = PENDING_THRESHOLD  # a stage pod Pending this long makes the job Stalled
    # Namespaces whose credentials Secrets the operator may read (the chart grants exactly these);
    # None: any (no chart: a developer's own kubeconfig).
    credential_namespaces: Optional[frozenset[str]] = None
    forbid_unsafe_pickle: bool = False  # refuse spec.model.allowUnsafePickle cluster-wide
    leader_election: Optional[LeaderElectionConfig] = None  # None: this replica leads alone
    # host[:port] patterns of the S3 endpoints jobs may name (the chart's storage.allowedEndpoints);
    # None: any. Keeps a tenant from pointing the operator, with its own keys, at any address.
    allowed_endpoints: Optional[tuple[str, ...]] = None
    # Queued runs (a kueue.x-k8s.io/queue-name label) get one Kueue Workload each: the chart's
    # kueue.enabled, which also grants the RBAC for Workloads and ResourceFlavors.
    kueue: bool = False

    @classmethod
    def from_env(cls) -> "OperatorConfig":
        return cls(
            runner=RunnerDefaults(image=os.environ.get("DISP_RUNNER_IMAGE") or RunnerDefaults.image,
                                  service_account=os.environ.get("DISP_RUNNER_SERVICE_ACCOUNT", ""),
                                  gpus=int(_number("DISP_RUNNER_GPUS", 1, 0)),
                                  node_selector=_json("DISP_RUNNER_NODE_SELECTOR", {}, dict),
                                  tolerations=tuple(_json("DISP_RUNNER_TOLERATIONS", [], list)),
                                  priority_class_name=os.environ.get("DISP_RUNNER_PRIORITY_CLASS", ""),
                                  log_format=_log_format("DISP_RUNNER_LOG_FORMAT"),
                                  gpu_memory_gib=_optional_number("DISP_RUNNER_GPU_MEMORY_GIB", 1.0)),
            backoff=RetryBackoff(base_seconds=_number("DISP_RETRY_BASE_SECONDS", 10.0, 0.0),
                                 maximum_seconds=_number("DISP_RETRY_MAX_SECONDS", 600.0, 0.0)),
            metrics_port=int(_number("DISP_METRICS_PORT", 9090, 0)),
            reconcile_interval=_number("DISP_RECONCILE_INTERVAL_SECONDS", 10.0, 0.01),
            progress_interval=_number("DISP_PROGRESS_INTERVAL_SECONDS", 10.0, 0.01),
            default_storage=_default_storage(),
            pending_threshold=timedelta(seconds=_number("DISP_PENDING_THRESHOLD_SECONDS",
                                                        PENDING_THRESHOLD.total_seconds(), 1.0)),
            credential_namespaces=_namespaces("DISP_CREDENTIAL_NAMESPACES"),
            forbid_unsafe_pickle=_flag("DISP_FORBID_UNSAFE_PICKLE"),
            leader_election=LeaderElectionConfig.from_env(),
            allowed_endpoints=_endpoints("DISP_ALLOWED_S3_ENDPOINTS"),
            kueue=_flag("DISP_KUEUE_ENABLED"),
        )


def _log_format(name: str) -> LogFormat:
    value = os.environ.get(name, "").strip() or LogFormat.TEXT.value
    try:
        return LogFormat(value)
    except ValueError:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(f.value for f in LogFormat)}") from None


def _namespaces(name: str) -> Optional[frozenset[str]]:
    """A comma-separated list of namespaces; unset: no restriction, set but empty: none at all."""
    raw = os.environ.get(name)
    if raw is None:
        return None
    return frozenset(ns.strip() for ns in raw.split(",") if ns.strip())


def _endpoints(name: str) -> Optional[tuple[str, ...]]:
    """Comma-separated host[:port] patterns; unset or empty: no restriction."""
    raw = os.environ.get(name, "")
    patterns = tuple(p.strip() for p in raw.split(",") if p.strip())
    for pattern in patterns:
        if "/" in pattern or " " in pattern:
            raise ConfigError(f"{name}: {pattern!r} is not a host[:port] pattern")
    return patterns or None


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "false").strip().lower()
    if raw not in ("true", "false"):
        raise ConfigError(f"{name}: {raw!r} is not true or false")
    return raw == "true"


def _default_storage() -> Optional[StorageSpec]:
    """The cluster's S3/MinIO, for PurificationJobs that do not name one (DISP_S3_ENDPOINT,
    DISP_S3_SECURE, DISP_S3_REGION, DISP_S3_CREDENTIALS_SECRET: a Secret name in each job's
    namespace, with keys accessKey and secretKey)."""
    endpoint = os.environ.get("DISP_S3_ENDPOINT")
    if not endpoint:
        return None
    secret = os.environ.get("DISP_S3_CREDENTIALS_SECRET")
    if not secret:
        raise ConfigError("DISP_S3_CREDENTIALS_SECRET: required when DISP_S3_ENDPOINT is set")
    secure = os.environ.get("DISP_S3_SECURE", "true").lower()
    if secure not in ("true", "false"):
        raise ConfigError(f"DISP_S3_SECURE: {secure!r} is not true or false")
    return StorageSpec(endpoint=endpoint, secure=secure == "true", region=os.environ.get("DISP_S3_REGION") or None,
                       credentials_secret=SecretKeyRef(name=secret))
