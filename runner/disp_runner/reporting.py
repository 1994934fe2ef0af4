"""Plain-text tables for people reading a terminal."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from disp_api import EvaluationMetrics, PurificationMetrics


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def format_metrics_table(rows: Sequence[EvaluationMetrics], baseline: EvaluationMetrics | None = None) -> str:
    header = f"{'model':<34} {'trigger':<8} {'target':<18} {'ASR':>7} {'false-fire':>10} {'clean':>7} {'Δclean':>7}"
    lines = [header, "-" * len(header)]
    for m in rows:
        trigger = m.attack.trigger.kind.value if m.attack else "-"
        target = m.attack.target.kind.value if m.attack else "-"
        asr = _pct(m.asr_triggered) if m.attack else "    -  "
        fire = _pct(m.asr_untriggered) if m.attack else "    -  "
        delta = f"{100 * (m.clean_performance - baseline.clean_performance):+6.1f}" if baseline else ""
        name = m.model if len(m.model) <= 34 else "…" + m.model[-33:]
        lines.append(f"{name:<34} {trigger:<8} {target:<18} {asr:>7} {fire:>10} {_pct(m.clean_performance):>7} {delta:>7}")
    return "\n".join(lines)


@dataclass
class PurificationRow:
    name: str
    metrics: PurificationMetrics
    localisation: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)


def format_purification_table(rows: Sequence[PurificationRow]) -> str:
    """ASR before -> after, false firing, clean performance before -> after, retention, trigger
    localisation, and the seconds each stage took."""
    header = (f"{'scenario':<26} {'ASR before':>10} {'ASR after':>10} {'false-fire':>10} {'clean before':>12} "
              f"{'clean after':>11} {'retention':>9} {'localised':>9}")
    lines = [header, "-" * len(header)]
    for row in rows:
        m = row.metrics
        clean_b = _pct(m.clean_performance_before) if m.clean_performance_before is not None else "-"
        clean_a = _pct(m.clean_performance_after) if m.clean_performance_after is not None else "-"
        retention = _pct(m.retention) if m.retention is not None else "-"
        local = _pct(row.localisation) if row.localisation is not None else "n/a"
        lines.append(f"{row.name:<26} {_pct(m.asr_before):>10} {_pct(m.asr_after):>10} "
                     f"{_pct(m.false_firing_after):>10} {clean_b:>12} {clean_a:>11} {retention:>9} {local:>9}")
    stages = list(dict.fromkeys(s for row in rows for s in row.stage_seconds))
    lines += ["", f"{'seconds per stage':<26} " + " ".join(f"{s:>10}" for s in stages)]
    for row in rows:
        lines.append(f"{row.name:<26} " + " ".join(f"{row.stage_seconds.get(s, 0.0):10.1f}" for s in stages))
    return "\n".join(lines)
