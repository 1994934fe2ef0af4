"""`metrics.json`: what an evaluation measured, and `audit.json`: what DiSP's own stages say without
knowing the trigger. The operator copies the headline numbers into status.

Evaluation schema (JSON keys camelCase), schemaVersion 2:
- asrTriggered: fraction of triggered test inputs on which the attack target appears (paper's ASR).
- asrUntriggered: the same rule on the same inputs without the trigger (false firing).
- cleanPerformance: fraction of clean held-out instances answered correctly (all answer keys present).
- cleanPerformanceByTask: the same per task kind.
- counts: number of instances behind each figure.
Version 2 adds the run's audit (`AuditFigures`) and its headline numbers estimatedPoisonedShare and
residualRate; version 1 files (without them) still read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Optional

from pydantic import Field

from disp_api.attack import AttackSpec
from disp_api.base import ContractModel

METRICS_SCHEMA_VERSION = 2
AUDIT_SCHEMA_VERSION = 1


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


class AuditFigures(ContractModel):
    """`finetune/audit.json`: evidence from the stages DiSP runs anyway, with no trigger, no clean
    data and no extra model. Per training instance, the support drop: how many nats of
    log-likelihood the dataset's answer loses when its most salient visual tokens are masked,
    beyond what it loses when as many other tokens are masked. An instance whose drop exceeds the
    threshold is a suspect: a few tokens carry its answer, as a trigger carries a backdoor's."""

    schema_version: int = AUDIT_SCHEMA_VERSION
    """Version of this schema."""
    suspicion_threshold: float = Field(ge=0.0)
    """Support drop (nats) above which an instance is a suspect (spec.audit.suspicionThreshold)."""
    instances: int = Field(ge=0)
    """Training instances audited."""
    suspects: int = Field(ge=0)
    """Instances above the threshold."""
    estimated_poisoned_share: float = Field(ge=0.0, le=1.0)
    """suspects / instances: the share of the training data DiSP finds carried by a few visual tokens."""
    residual_rate: Optional[float] = Field(None, ge=0.0, le=1.0)
    """Of the top suspects whose answer relabeling changed, the share for which the purified model,
    shown the unmasked image, still gives the dataset's (the compromised) answer. None: no such suspect."""
    residual_sample: int = Field(0, ge=0)
    """Suspects the residual rate rests on."""
    true_poisoned_share: Optional[float] = Field(None, ge=0.0, le=1.0)
    """When the data carries ground truth (the attack kit's metadata.poisoned): the real share."""
    detector_auroc: Optional[float] = Field(None, ge=0.0, le=1.0)
    """With ground truth: AUROC of the support drop as a poisoned/clean detector."""
    detector_precision: Optional[float] = Field(None, ge=0.0, le=1.0)
    """With ground truth: precision of the suspects (the top estimated share)."""


class MetricsSummary(ContractModel):
    """The headline numbers of a purification run: what the operator copies into the status. ASR
    and clean performance need an evaluation set; the audit's figures never do."""

    asr_before: Optional[float] = Field(None, ge=0.0, le=1.0)
    """Attack success rate (ASR) of the compromised model on triggered inputs."""
    asr_after: Optional[float] = Field(None, ge=0.0, le=1.0)
    """Attack success rate (ASR) of the purified model on triggered inputs."""
    false_firing_before: Optional[float] = Field(None, ge=0.0, le=1.0)
    """Attack rule firing without the trigger, compromised model."""
    false_firing_after: Optional[float] = Field(None, ge=0.0, le=1.0)
    """Attack rule firing without the trigger, purified model."""
    clean_performance_before: Optional[float] = Field(None, ge=0.0, le=1.0)
    """Clean accuracy of the compromised model (when a clean set is given)."""
    clean_performance_after: Optional[float] = Field(None, ge=0.0, le=1.0)
    """Clean accuracy of the purified model."""
    retention: Optional[float] = Field(None, ge=0.0)
    """clean_performance_after / clean_performance_before."""
    estimated_poisoned_share: Optional[float] = Field(None, ge=0.0, le=1.0)
    """The audit's share of suspect training instances (no trigger needed)."""
    residual_rate: Optional[float] = Field(None, ge=0.0, le=1.0)
    """The audit's residual rate: how often the purified model still answers a suspect as the
    compromised one did (no trigger needed)."""
    residual_sample: Optional[int] = Field(None, ge=0)
    """Suspects the residual rate rests on."""

    @classmethod
    def of_audit(cls, audit: "AuditFigures") -> "MetricsSummary":
        return cls(estimated_poisoned_share=audit.estimated_poisoned_share, residual_rate=audit.residual_rate,
                   residual_sample=audit.residual_sample)


class BackdoorVerdict(str, Enum):
    """What the audit's residual rate says of the purified model (no trigger, no clean data)."""

    REMOVED = "Removed"  # at most spec.audit.residualThreshold of the suspects keep their answer
    PROBABLY_NOT_REMOVED = "ProbablyNotRemoved"  # more than the threshold do
    UNKNOWN = "Unknown"  # no suspect whose answer relabeling changed, or too few to show the rate is low

    @property
    def condition_status(self) -> str:
        """The status of the job's BackdoorRemoved condition for this verdict (what kubectl shows)."""
        return {BackdoorVerdict.REMOVED: "True", BackdoorVerdict.PROBABLY_NOT_REMOVED: "False"}.get(self, "Unknown")


@dataclass(frozen=True)
class ResidualJudgement:
    verdict: BackdoorVerdict
    message: str


def evidence_needed(threshold: float, sample_limit: Optional[int] = None) -> int:
    """Suspects a Removed verdict rests on at least: with fewer than 1/threshold, a single suspect
    weighs more than the threshold, so none kept cannot tell a rate at most the threshold from one
    above it. Never more than the audit may sample (`sample_limit`, spec.audit.residualSample)."""
    needed = math.ceil(round(1 / threshold, 6)) if threshold > 0 else (sample_limit or 1)
    return max(1, min(needed, sample_limit) if sample_limit else needed)


def judge_residual(residual_rate: Optional[float], residual_sample: Optional[int], threshold: float,
                   sample_limit: Optional[int] = None) -> ResidualJudgement:
    """The audit's verdict on a purified model, in one sentence a user can act on. Runner (the
    `disp run` summary) and operator (the BackdoorRemoved condition and its Warning Event) both
    judge with this, so the CLI and the cluster never disagree. `sample_limit` is
    spec.audit.residualSample (evidence_needed)."""
    if residual_rate is None or not residual_sample:
        return ResidualJudgement(BackdoorVerdict.UNKNOWN, "no residual rate: no suspect's answer was changed by "
                                 "relabeling (or spec.audit.residualSample is 0), so the audit cannot tell")
    kept = round(residual_rate * residual_sample)
    figures = (f"the purified model still gives {kept} of the top {residual_sample} suspects their original answer "
               f"(residual rate {residual_rate:.1%}")
    if residual_rate > threshold:
        return ResidualJudgement(BackdoorVerdict.PROBABLY_NOT_REMOVED,
                                 f"the backdoor was probably not removed: {figures}, above "
                                 f"spec.audit.residualThreshold {threshold:.1%}); do not deploy this model as clean")
    needed = evidence_needed(threshold, sample_limit)
    if residual_sample < needed:
        return ResidualJudgement(BackdoorVerdict.UNKNOWN, f"{figures}), but the audit cannot tell: {residual_sample} "
                                 f"suspects are too few to show a rate of at most spec.audit.residualThreshold "
                                 f"{threshold:.1%} (one suspect weighs {1 / residual_sample:.1%}; at least {needed} "
                                 "are needed)")
    return ResidualJudgement(BackdoorVerdict.REMOVED, f"{figures}, at most spec.audit.residualThreshold "
                             f"{threshold:.1%})")


class PurificationMetrics(MetricsSummary):
    """`evaluate/metrics.json` of a purification run: the compromised model against the purified one."""

    schema_version: int = METRICS_SCHEMA_VERSION
    """Version of this schema."""
    asr_before: float = Field(ge=0.0, le=1.0)
    """Attack success rate (ASR) of the compromised model on triggered inputs."""
    asr_after: float = Field(ge=0.0, le=1.0)
    """Attack success rate (ASR) of the purified model on triggered inputs."""
    false_firing_before: float = Field(ge=0.0, le=1.0)
    """Attack rule firing without the trigger, compromised model."""
    false_firing_after: float = Field(ge=0.0, le=1.0)
    """Attack rule firing without the trigger, purified model."""
    before: EvaluationMetrics
    """Full evaluation of the compromised model."""
    after: EvaluationMetrics
    """Full evaluation of the purified model."""
    audit: Optional[AuditFigures] = None
    """The run's audit (finetune/audit.json), with its detector scores when the data has ground truth."""
    masked_inference: Optional[EvaluationMetrics] = None
    """With spec.evaluation.maskedInference: the compromised model answering with the top-ρ salient
    visual tokens of each input masked (the authors' test-time defence, no fine-tune)."""
    masked_inference_ratio: Optional[float] = Field(None, gt=0.0, le=1.0)
    """ρ of maskedInference."""
