"""The operator's own settings, from its environment (the Helm chart sets them). Read once, at startup."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from disp_operator.jobs import RunnerDefaults
from disp_operator.reconcile import RetryBackoff


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


@dataclass(frozen=True)
class OperatorConfig:
    runner: RunnerDefaults = field(default_factory=RunnerDefaults)
    backoff: RetryBackoff = field(default_factory=RetryBackoff)
    metrics_port: int = 9090  # 0: no metrics server
    reconcile_interval: float = 10.0  # seconds between passes when nothing wakes a job earlier
    progress_interval: float = 10.0  # seconds between reads of a running job's progress.json

    @classmethod
    def from_env(cls) -> "OperatorConfig":
        return cls(
            runner=RunnerDefaults(image=os.environ.get("DISP_RUNNER_IMAGE") or RunnerDefaults.image,
                                  service_account=os.environ.get("DISP_RUNNER_SERVICE_ACCOUNT", "")),
            backoff=RetryBackoff(base_seconds=_number("DISP_RETRY_BASE_SECONDS", 10.0, 0.0),
                                 maximum_seconds=_number("DISP_RETRY_MAX_SECONDS", 600.0, 0.0)),
            metrics_port=int(_number("DISP_METRICS_PORT", 9090, 0)),
            reconcile_interval=_number("DISP_RECONCILE_INTERVAL_SECONDS", 10.0, 0.01),
            progress_interval=_number("DISP_PROGRESS_INTERVAL_SECONDS", 10.0, 0.01),
        )
