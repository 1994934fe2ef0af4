"""Plain-text tables for people reading a terminal."""

from __future__ import annotations

from typing import Sequence

from disp_api import EvaluationMetrics


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
