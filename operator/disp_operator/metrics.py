"""Prometheus metrics of the operator, for dashboards and the chart's alert rules. Per-job series are
bounded: they exist while a PurificationJob exists and are dropped when it is deleted.

Per-job series carry the job's `namespace` and `name`; the chart's ServiceMonitor sets
`honorLabels` so that `namespace` stays the job's (as kube-state-metrics does) instead of being
renamed `exported_namespace` beside the operator's own. Counters exist from the start, at 0, for
every stage and reason, so `increase()` sees a first failure."""

from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from disp_api import StageName
from disp_api import MetricsSummary
from disp_api.status import JobPhase, Reason
from disp_operator.children import FailureKind

# The reasons a stage or a job fails for good, and the failure kinds that are retried.
STAGE_FAILURE_REASONS = (Reason.STAGE_FAILED, Reason.BACKOFF_LIMIT_EXCEEDED, Reason.DEADLINE_EXCEEDED)
JOB_FAILURE_REASONS = (Reason.INVALID_SPEC, *STAGE_FAILURE_REASONS, Reason.ARTIFACTS_TAMPERED)
RETRYABLE_FAILURES = tuple(kind for kind in FailureKind if kind.retryable)

# Stages take seconds (embedded model) to many hours (billions of parameters on GPUs).
STAGE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400, float("inf"))


class OperatorMetrics:
    def __init__(self, registry: Optional[CollectorRegistry] = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("disp_purification_jobs", "PurificationJobs by phase.", ["phase"], registry=r)
        self.stage_duration = Histogram("disp_stage_duration_seconds", "Wall time of a stage from its first attempt "
                                        "to its outcome.", ["stage", "result"], buckets=STAGE_BUCKETS, registry=r)
        self.stage_retries = Counter("disp_stage_retries_total", "Stage attempts that failed and were retried.",
                                     ["stage", "failure"], registry=r)
        self.stage_failures = Counter("disp_stage_failures_total", "Stages that failed for good.",
                                      ["stage", "reason"], registry=r)
        self.job_failures = Counter("disp_job_failures_total", "PurificationJobs that failed, by reason (InvalidSpec "
                                    "included).", ["reason"], registry=r)
        self.job_phase = Gauge("disp_job_phase", "1 for the phase each PurificationJob is in, 0 for the others "
                               "(alerts name the job).", ["namespace", "name", "phase"], registry=r)
        self.last_progress = Gauge("disp_job_last_progress_timestamp_seconds", "When an active job last made "
                                   "progress (Unix time); alert when it stops moving.", ["namespace", "name"], registry=r)
        self.progress = Gauge("disp_job_progress_ratio", "Fraction of an active job's stages done.",
                              ["namespace", "name"], registry=r)
        self.pending = Gauge("disp_job_pending_pod_seconds", "How long the running stage's oldest pod has been "
                             "Pending (0 once it runs); the stall alert fires on it.", ["namespace", "name"], registry=r)
        self.asr_before = Gauge("disp_job_asr_before_ratio", "Attack success rate before purification, finished "
                                "jobs.", ["namespace", "name"], registry=r)
        self.asr_after = Gauge("disp_job_asr_after_ratio", "Attack success rate after purification, finished jobs.",
                               ["namespace", "name"], registry=r)
        self.clean_before = Gauge("disp_job_clean_performance_before_ratio", "Clean performance of the compromised "
                                  "model, finished jobs with a clean set.", ["namespace", "name"], registry=r)
        self.clean_after = Gauge("disp_job_clean_performance_after_ratio", "Clean performance of the purified model, "
                                 "finished jobs with a clean set.", ["namespace", "name"], registry=r)
        self.poisoned_share = Gauge("disp_job_estimated_poisoned_share_ratio", "The audit's share of suspect "
                                    "training instances (no trigger needed), finished jobs.", ["namespace", "name"],
                                    registry=r)
        self.residual = Gauge("disp_job_residual_rate_ratio", "The audit's residual rate: how often the purified "
                              "model still answers a suspect as the compromised one did, finished jobs.",
                              ["namespace", "name"], registry=r)
        self.retention = Gauge("disp_job_retention_ratio", "Clean performance after / before purification, finished "
                               "jobs with a clean set.", ["namespace", "name"], registry=r)
        self.round = Gauge("disp_job_round", "The purification round (spec.rounds) an active job is in; once it "
                           "finished, the round whose model it kept.", ["namespace", "name"], registry=r)
        self.backdoor_removed = Gauge("disp_job_backdoor_removed", "The audit's verdict on a finished job's purified "
                                      "model, as its BackdoorRemoved condition: 1 removed, 0 probably not removed "
                                      "(no series without a residual sample).", ["namespace", "name"], registry=r)
        self.handler_runs = Counter("disp_operator_reconciles_total", "Reconcile passes.", registry=r)
        self.leader = Gauge("disp_operator_leader", "1 while this replica leads (only the leader reconciles and "
                            "exports job series), 0 while it waits.", registry=r)
        self.handler_errors = Counter("disp_operator_reconcile_errors_total", "Reconcile passes that raised.",
                                      ["error"], registry=r)
        self.handler_latency = Histogram("disp_operator_reconcile_duration_seconds", "Time of one reconcile pass.",
                                         registry=r)
        self._phases: dict[tuple[str, str], JobPhase] = {}
        for phase in JobPhase:
            self.jobs.labels(phase.value).set(0)
        for stage in StageName:  # every series from the start: increase() needs the 0 before the first 1
            for reason in STAGE_FAILURE_REASONS:
                self.stage_failures.labels(stage.value, reason.value)
            for kind in RETRYABLE_FAILURES:
                self.stage_retries.labels(stage.value, kind.value)
        for reason in JOB_FAILURE_REASONS:
            self.job_failures.labels(reason.value)

    def set_phase(self, namespace: str, name: str, phase: JobPhase) -> None:
        key = (namespace, name)
        old = self._phases.get(key)
        if old is phase:
            return
        if old is not None:
            self.jobs.labels(old.value).dec()
        self.jobs.labels(phase.value).inc()
        self._phases[key] = phase
        for each in JobPhase:
            self.job_phase.labels(namespace, name, each.value).set(1 if each is phase else 0)

    def set_progress(self, namespace: str, name: str, ratio: float, at_timestamp: float) -> None:
        self.progress.labels(namespace, name).set(ratio)
        self.last_progress.labels(namespace, name).set(at_timestamp)

    def set_waiting(self, namespace: str, name: str) -> None:
        """A suspended (or not yet started) job makes no progress by choice: no activity series, so
        no stall alert."""
        for gauge in (self.progress, self.last_progress, self.pending):
            _remove(gauge, namespace, name)

    def set_pending(self, namespace: str, name: str, seconds: float) -> None:
        if seconds > 0:
            self.pending.labels(namespace, name).set(seconds)
        else:
            _remove(self.pending, namespace, name)

    def set_round(self, namespace: str, name: str, round_number: int) -> None:
        self.round.labels(namespace, name).set(round_number)

    def set_verdict(self, namespace: str, name: str, removed: Optional[bool]) -> None:
        if removed is None:
            _remove(self.backdoor_removed, namespace, name)
        else:
            self.backdoor_removed.labels(namespace, name).set(1 if removed else 0)

    def set_outcome(self, namespace: str, name: str, metrics: Optional[MetricsSummary]) -> None:
        """A finished job: its ASR and clean performance stay visible, its activity series go."""
        for gauge in (self.progress, self.last_progress, self.pending):
            _remove(gauge, namespace, name)
        if metrics is not None:
            for gauge, value in ((self.asr_before, metrics.asr_before), (self.asr_after, metrics.asr_after),
                                 (self.clean_before, metrics.clean_performance_before),
                                 (self.clean_after, metrics.clean_performance_after),
                                 (self.retention, metrics.retention),
                                 (self.poisoned_share, metrics.estimated_poisoned_share),
                                 (self.residual, metrics.residual_rate)):
                if value is not None:
                    gauge.labels(namespace, name).set(value)

    def job_failed(self, reason: Reason) -> None:
        self.job_failures.labels(reason.value).inc()

    def stage_finished(self, stage: StageName, succeeded: bool, seconds: float) -> None:
        self.stage_duration.labels(stage.value, "succeeded" if succeeded else "failed").observe(max(0.0, seconds))

    def forget(self, namespace: str, name: str) -> None:
        """The job was deleted: drop every series that names it."""
        old = self._phases.pop((namespace, name), None)
        if old is not None:
            self.jobs.labels(old.value).dec()
        for gauge in (self.progress, self.last_progress, self.pending, self.asr_before, self.asr_after,
                      self.clean_before, self.clean_after, self.retention, self.poisoned_share, self.residual,
                      self.round, self.backdoor_removed):
            _remove(gauge, namespace, name)
        for phase in JobPhase:
            _remove(self.job_phase, namespace, name, phase.value)


def _remove(gauge: Gauge, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass
