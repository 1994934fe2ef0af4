"""The shared contracts: camelCase on the wire, strict, immutable, and free of heavy imports."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from disp_api import AttackSpec, AttackTarget, EvaluationMetrics, MetricsCounts, TriggerKind


def test_wire_format_is_camel_case_and_round_trips():
    spec = AttackSpec.model_validate({"trigger": {"kind": "blended", "alpha": 0.3},
                                      "target": {"kind": "misclassification", "sourceClass": "cross",
                                                 "targetClass": "diamond"},
                                      "poisonRate": 0.1})
    assert spec.trigger.kind is TriggerKind.BLENDED and spec.target.kind is AttackTarget.MISCLASSIFICATION
    wire = spec.to_wire()
    assert wire["poisonRate"] == 0.1 and wire["target"]["sourceClass"] == "cross"
    assert AttackSpec.model_validate(wire) == spec


def test_unknown_fields_are_errors_naming_the_field():
    with pytest.raises(ValidationError, match="poisonRatio"):
        AttackSpec.model_validate({"poisonRatio": 0.2})
    with pytest.raises(ValidationError, match="trigger.kind"):
        AttackSpec.model_validate({"trigger": {"kind": "sticker"}})


def test_contracts_are_frozen():
    spec = AttackSpec()
    with pytest.raises(ValidationError):
        spec.poison_rate = 0.5  # type: ignore[misc]


def test_metrics_bounds_are_enforced():
    counts = MetricsCounts(triggered=1, untriggered=1, clean=1).to_wire()
    with pytest.raises(ValidationError, match="asrTriggered"):
        EvaluationMetrics.model_validate({"model": "m", "asrTriggered": 1.5, "asrUntriggered": 0,
                                          "cleanPerformance": 1, "counts": counts})


def test_api_package_imports_no_ml_or_kubernetes_stack():
    code = ("import sys, disp_api; heavy = {'torch', 'transformers', 'kopf', 'kubernetes'} & set(sys.modules); "
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
