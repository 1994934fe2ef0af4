"""One Kueue admission per run: a PurificationJob labelled with a LocalQueue
(`kueue.x-k8s.io/queue-name`) is one Kueue Workload, owned by the job and sized for its largest
stage. Kueue admits it once; every stage Job of the run then starts at once on the admitted
flavor's nodes, none of them queued on its own, and the quota is held from the first stage to the
last: a run neither gives its place back between stages nor is overtaken while it runs.

The operator is the Workload's "external framework" (Kueue's term: a controller that makes its own
Workloads, as AppWrapper and JobSet's do): it creates the Workload, starts stages only while it is
admitted, stops the running stage and releases the quota reservation when Kueue evicts it
(preemption, deactivation), and marks it Finished when the run ends. A Kueue configured with
`integrations.externalFrameworks: [PurificationJob.v1alpha1.disp.dev]` also holds back (suspends)
any stage Job of a run whose Workload is not admitted.

Pure functions over dicts here; service.py does the calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Mapping, Optional

from disp_api import PurificationJob, StageName

KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"
KUEUE_API = f"{KUEUE_GROUP}/{KUEUE_VERSION}"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
EXTERNAL_FRAMEWORK = "PurificationJob.v1alpha1.disp.dev"  # Kueue's Kind.version.group form
POD_SET = "stage"  # the one pod set: the pods of whichever stage runs


def queue_name(job: PurificationJob) -> Optional[str]:
    """The Kueue LocalQueue the run waits in, if the job names one."""
    return job.metadata.labels.get(QUEUE_LABEL)


def workload_name(name: str, uid: Optional[str]) -> str:
    """The Workload of the PurificationJob `name`: deterministic (one per job, created
    idempotently); the uid's head tells a job re-created under the same name from the one whose
    Workload may still be being deleted."""
    return f"purificationjob-{name}-{(uid or '')[:5]}"


class AdmissionState(str, Enum):
    PENDING = "Pending"  # queued: no quota reserved yet
    ADMITTED = "Admitted"  # quota reserved and admission checks passed: stages may run
    EVICTED = "Evicted"  # Kueue took the admission back (preemption, deactivation): stop, release
    FINISHED = "Finished"  # the run ended (or something marked it so): holds no quota


@dataclass(frozen=True)
class Admission:
    """The run's Workload as the reconcile decides on it."""

    state: AdmissionState
    message: str = ""  # Kueue's word on why it waits or was evicted
    flavors: tuple[str, ...] = ()  # the ResourceFlavors admitted, for the pods' node selection
    node_selector: Mapping[str, str] = field(default_factory=dict)  # the flavors' nodeLabels
    tolerations: tuple[Mapping[str, Any], ...] = ()  # the flavors' tolerations


def _true(conditions: list[dict[str, Any]], kind: str) -> Optional[dict[str, Any]]:
    return next((c for c in conditions if c.get("type") == kind and c.get("status") == "True"), None)


def admission_of(workload: Mapping[str, Any]) -> Admission:
    """What a Workload says, from its status conditions (Kueue's Finished, Evicted, Admitted,
    QuotaReserved) and, when admitted, the flavors of its pod set."""
    status = workload.get("status") or {}
    conditions = status.get("conditions") or []
    if (finished := _true(conditions, "Finished")) is not None:
        return Admission(AdmissionState.FINISHED, finished.get("message", ""))
    if (evicted := _true(conditions, "Evicted")) is not None and _true(conditions, "QuotaReserved"):
        return Admission(AdmissionState.EVICTED, evicted.get("message", ""))
    if _true(conditions, "Admitted") is not None:
        assignments = (status.get("admission") or {}).get("podSetAssignments") or []
        flavors = sorted({name for a in assignments for name in (a.get("flavors") or {}).values()})
        return Admission(AdmissionState.ADMITTED, flavors=tuple(flavors))
    waiting = next((c for c in conditions if c.get("type") == "QuotaReserved"), None)
    return Admission(AdmissionState.PENDING, (waiting or {}).get("message", ""))


def with_flavors(admission: Admission, flavors: list[Mapping[str, Any]]) -> Admission:
    """The admission with the node labels and tolerations of its ResourceFlavors (their specs), which
    Kueue would inject into the pods of a job it starts itself."""
    selector: dict[str, str] = {}
    tolerations: list[Mapping[str, Any]] = []
    for flavor in flavors:
        spec = flavor.get("spec") or {}
        selector.update(spec.get("nodeLabels") or {})
        tolerations += [t for t in spec.get("tolerations") or [] if t not in tolerations]
    return Admission(admission.state, admission.message, admission.flavors, selector, tuple(tolerations))


def _quantity(value: Any) -> float:
    """A Kubernetes quantity as a number, to compare requests (the pod spec keeps the original)."""
    text = str(value)
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for suffix, factor in sorted(suffixes.items(), key=lambda item: -len(item[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def run_workload(job: PurificationJob, stage_pods: Mapping[StageName, tuple[int, dict[str, Any]]],
                 owner: Mapping[str, Any], priority: Optional[int] = None) -> dict[str, Any]:
    """The run's Workload: one pod set as large as the run's largest stage — as many pods as its
    widest stage (shards, fine-tune nodes) and, per resource, the most any stage's pod requests —
    so the quota Kueue reserves once covers every stage. `stage_pods`: each stage's pod count and
    pod spec (as its Job would run it); `priority`: the value of the job's WorkloadPriorityClass
    (its kueue.x-k8s.io/priority-class label), which the Workload references."""
    count = max(pods for pods, _ in stage_pods.values())
    requests: dict[str, Any] = {}
    template: Optional[dict[str, Any]] = None
    for _, pod in stage_pods.values():
        container = pod["containers"][0]
        for name, value in (container.get("resources") or {}).get("requests", {}).items():
            if name not in requests or _quantity(value) > _quantity(requests[name]):
                requests[name] = value
        if template is None or container["resources"]["requests"].get("nvidia.com/gpu"):
            template = pod  # a GPU stage's pod: its node selection is what the flavor must satisfy
    assert template is not None, "a run has stages"
    container = {**template["containers"][0], "resources": {"requests": dict(requests), "limits": dict(requests)}}
    pod = {**template, "containers": [container]}
    meta = job.metadata
    labels = {key: meta.labels[key] for key in (PRIORITY_LABEL,) if key in meta.labels}
    return {
        "apiVersion": KUEUE_API,
        "kind": "Workload",
        "metadata": {"name": workload_name(meta.name, meta.uid), "namespace": meta.namespace, "labels": labels,
                     "ownerReferences": [dict(owner)]},
        "spec": {"queueName": queue_name(job), "podSets": [{"name": POD_SET, "count": count,
                                                             "template": {"spec": pod}}],
                 **_priority(job, priority)},
    }


def priority_class(job: PurificationJob) -> Optional[str]:
    """The Kueue WorkloadPriorityClass the job names (its kueue.x-k8s.io/priority-class label)."""
    return job.metadata.labels.get(PRIORITY_LABEL)


def _priority(job: PurificationJob, value: Optional[int]) -> dict[str, Any]:
    name = priority_class(job)
    if name is None:
        return {}
    assert value is not None, "the WorkloadPriorityClass was read before the Workload is made"
    return {"priorityClassRef": {"group": KUEUE_GROUP, "kind": "WorkloadPriorityClass", "name": name},
            "priority": value}


def _set_condition(conditions: list[dict[str, Any]], kind: str, status: bool, reason: str, message: str,
                   now: datetime, generation: int) -> list[dict[str, Any]]:
    value = "True" if status else "False"
    old = next((c for c in conditions if c.get("type") == kind), None)
    changed_at = old["lastTransitionTime"] if old is not None and old.get("status") == value else \
        now.strftime("%Y-%m-%dT%H:%M:%SZ")
    new = {"type": kind, "status": value, "reason": reason, "message": message[:32768],
           "lastTransitionTime": changed_at, "observedGeneration": generation}
    return [c for c in conditions if c.get("type") != kind] + [new]


def released_status(workload: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The status that gives an evicted Workload's quota back once its stage has stopped: no
    admission, QuotaReserved and Admitted false, Requeued (Kueue queues it again), as Kueue's own
    job integration writes it."""
    status = workload.get("status") or {}
    conditions = list(status.get("conditions") or [])
    evicted = _true(conditions, "Evicted") or {}
    message, reason = evicted.get("message", "evicted"), evicted.get("reason", "Evicted")
    generation = (workload.get("metadata") or {}).get("generation", 0)
    requeue = reason in ("Preempted", "NodeFailures")
    conditions = _set_condition(conditions, "Requeued", requeue, reason, message, now, generation)
    conditions = _set_condition(conditions, "QuotaReserved", False, "Pending", message, now, generation)
    conditions = _set_condition(conditions, "Admitted", False, "NoReservation", "The workload has no reservation",
                                now, generation)
    return {**status, "admission": None, "conditions": conditions}


def finished_status(workload: Mapping[str, Any], succeeded: bool, message: str, now: datetime) -> dict[str, Any]:
    """The status that ends the Workload (Kueue frees its quota): Finished, Succeeded or Failed."""
    status = workload.get("status") or {}
    generation = (workload.get("metadata") or {}).get("generation", 0)
    conditions = _set_condition(list(status.get("conditions") or []), "Finished", True,
                                "Succeeded" if succeeded else "Failed", message, now, generation)
    return {**status, "conditions": conditions}
