"""Typed contracts shared by the DiSP operator and runner (pydantic only: no torch, kopf or
kubernetes imports, so the operator image stays small)."""

from disp_api.attack import AttackSpec, AttackTarget, Corner, TargetSpec, TriggerKind, TriggerSpec
from disp_api.metrics import EvaluationMetrics, MetricsCounts

__all__ = [
    "AttackSpec",
    "AttackTarget",
    "Corner",
    "EvaluationMetrics",
    "MetricsCounts",
    "TargetSpec",
    "TriggerKind",
    "TriggerSpec",
]
