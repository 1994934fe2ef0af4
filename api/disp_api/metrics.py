"""`metrics.json`: what an evaluation measured. The operator copies these numbers into status.

Schema (JSON keys camelCase), schemaVersion 1:
- asrTriggered: fraction of triggered test inputs on which the attack target appears (paper's ASR).
- asrUntriggered: the same rule on the same inputs without the trigger (false firing).
- cleanPerformance: fraction of clean held-out instances answered correctly (all answer keys present).
- cleanPerformanceByTask: the same per task kind.
- counts: number of instances behind each figure.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from disp_api.attack import AttackSpec
from disp_api.base import ContractModel

METRICS_SCHEMA_VERSION = 1


class MetricsCounts(ContractModel):
    triggered: int = Field(ge=0)
    """Triggered test instances scored for ASR."""
    untriggered: int = Field(ge=0)
    """Untriggered counterparts scored for false firing."""
    clean: int = Field(ge=0)
    """Clean held-out instances scored for clean performance."""


class EvaluationMetrics(ContractModel):
    schema_version: int = METRICS_SCHEMA_VERSION
    """Version of this schema."""
    model: str
    """Model folder or URI that was evaluated."""
    attack: Optional[AttackSpec] = None
    """Trigger and target the ASR rule was applied for."""
    asr_triggered: float = Field(ge=0.0, le=1.0)
    """Attack success rate on triggered inputs."""
    asr_untriggered: float = Field(ge=0.0, le=1.0)
    """Attack rule firing on the same inputs without trigger."""
    clean_performance: float = Field(ge=0.0, le=1.0)
    """Task accuracy on clean held-out inputs."""
    clean_performance_by_task: dict[str, float] = {}
    """Task accuracy per task kind."""
    counts: MetricsCounts
    """How many instances each figure rests on."""
    decoding: dict[str, float] = {}
    """Decoding settings used (steps, genLength, blockLength, temperature)."""
    seconds: float = Field(0.0, ge=0.0)
    """Wall time of the evaluation."""


class MetricsSummary(ContractModel):
    """The headline numbers of a purification run: what the operator copies into the status."""

    asr_before: float = Field(ge=0.0, le=1.0)
    """Attack success rate (ASR) of the compromised model on triggered inputs."""
    asr_after: float = Field(ge=0.0, le=1.0)
    """Attack success rate (ASR) of the purified model on triggered inputs."""
    false_firing_before: float = Field(ge=0.0, le=1.0)
    """Attack rule firing without the trigger, compromised model."""
    false_firing_after: float = Field(ge=0.0, le=1.0)
    """Attack rule firing without the trigger, purified model."""
    clean_performance_before: Optional[float] = Field(None, ge=0.0, le=1.0)
    """Clean accuracy of the compromised model (when a clean set is given)."""
    clean_performance_after: Optional[float] = Field(None, ge=0.0, le=1.0)
    """Clean accuracy of the purified model."""
    retention: Optional[float] = Field(None, ge=0.0)
    """clean_performance_after / clean_performance_before."""


class PurificationMetrics(MetricsSummary):
    """`evaluate/metrics.json` of a purification run: the compromised model against the purified one."""

    schema_version: int = METRICS_SCHEMA_VERSION
    """Version of this schema."""
    before: EvaluationMetrics
    """Full evaluation of the compromised model."""
    after: EvaluationMetrics
    """Full evaluation of the purified model."""
