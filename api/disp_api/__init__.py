"""Typed contracts shared by the DiSP operator and runner (pydantic only: no torch, kopf or
kubernetes imports, so the operator image stays small)."""

from disp_api.attack import AttackRecord, AttackSpec, AttackTarget, Corner, TargetSpec, TriggerKind, TriggerSpec
from disp_api.metrics import (AuditFigures, BackdoorVerdict, EvaluationMetrics, MetricsCounts, MetricsSummary,
                              PurificationMetrics, ResidualJudgement, judge_residual)
from disp_api.progress import StageProgress
from disp_api.rounds import Recipe, RoundRecord
from disp_api.spec import (
    DatasetSource,
    DecodingCache,
    DecodingSpec,
    EmptyAnswers,
    EvaluationSpec,
    FinetuneLabels,
    FinetuneSharding,
    FinetuneSpec,
    LogFormat,
    MaskingFill,
    MaskingSpace,
    MaskingSpec,
    ModelSource,
    ObjectMeta,
    OutputSpec,
    ParallelismSpec,
    PurificationJob,
    PurificationJobSpec,
    RelabelAcceptance,
    RelabelSpec,
    RoundPolicy,
    RoundsSpec,
    ProbeDraws,
    Profile,
    SaliencySpec,
    SecretKeyRef,
    StageName,
    StorageSpec,
    TrainableParts,
)

__all__ = [
    "AttackRecord", "AttackSpec", "AttackTarget", "AuditFigures", "BackdoorVerdict", "Corner", "DatasetSource", "DecodingCache", "DecodingSpec", "EmptyAnswers", "EvaluationMetrics", "EvaluationSpec",
    "FinetuneLabels", "FinetuneSharding", "FinetuneSpec", "LogFormat", "MaskingFill", "MaskingSpace", "MaskingSpec", "MetricsCounts", "MetricsSummary", "ModelSource", "ObjectMeta", "OutputSpec", "ParallelismSpec",
    "PurificationJob", "PurificationJobSpec", "PurificationMetrics", "ResidualJudgement", "judge_residual", "Recipe", "RoundPolicy", "RoundRecord", "RoundsSpec", "RelabelAcceptance", "RelabelSpec", "ProbeDraws", "Profile", "SaliencySpec", "SecretKeyRef", "StageName", "StageProgress", "StorageSpec",
    "TargetSpec", "TrainableParts", "TriggerKind", "TriggerSpec",
]
