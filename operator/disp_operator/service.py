"""One PurificationJob's reconcile loop: observe, decide (reconcile.py), act. The operator keeps
exactly one loop per job (`OperatorRuntime.ensure_loop`, driven by the job's watch events), and it
is the only writer of the job's status: it keeps the status it wrote in memory rather than
re-reading a possibly stale one. (Not a kopf daemon: kopf puts a finalizer on every object a
daemon runs for, and a finalizer makes deleting a job hang whenever no operator runs.)

Order of effects: status first (the intent), then Job deletions and creations, then Events. An
operator stopped between two effects repeats the same decision after its restart, and creating
a Job that exists is a no-op, so no stage runs twice."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

import kopf
from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from disp_api import PurificationJob, StageName
from disp_api.status import ConditionStatus, ConditionType, JobPhase, PurificationJobStatus, Reason, StagePhase
from disp_operator.artifacts import ArtifactsTampered, RunStore
from disp_operator.children import ChildJob, PendingPod, PodOutcome, StartedPod
from disp_operator.config import OperatorConfig
from disp_operator.jobs import finetune_nodes, rendezvous_service, run_workload_manifest, stage_job
from disp_operator.kueue import (PRIORITY_LABEL, QUEUE_LABEL, Admission, AdmissionState, admission_of,
                                 finished_status, priority_class, queue_name, released_status, with_flavors,
                                 workload_name)
from disp_operator.kube import KubeApi
from disp_operator.memory import check_floors, stage_floors
from disp_operator.metrics import OperatorMetrics
from disp_operator.naming import ANNOTATION_RUNNER_IMAGE, FOLLOW_IMAGE_TAG
from disp_operator.reconcile import Observation, Plan, WorkloadAction, finished_at, kept_round, reconcile, reject
from disp_operator.validation import (ClusterFacts, ConfigProblem, InvalidSpec, check_cluster, check_policy, check_static,
                                      parse_job)
from disp_store.s3 import StoreError, StoreUnavailableError

ERROR_BACKOFF = 5.0  # seconds before a pass that raised is repeated
FINISHED_INTERVAL = 60.0  # a finished job is only looked at for spec edits to acknowledge


@dataclass
class OperatorRuntime:
    """What every job's loop shares; built once at operator startup."""

    config: OperatorConfig
    kube: KubeApi
    metrics: OperatorMetrics
    wakeups: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    metrics_server: Any = None  # prometheus_client's HTTP server, when enabled
    leadership: Any = None  # leadership.LeaderElector, with leader election on
    leadership_task: Optional[asyncio.Task] = None  # its renewals

    loops: dict[tuple[str, str], "JobLoop"] = field(default_factory=dict)

    def wake(self, namespace: str, name: str) -> None:
        event = self.wakeups.get((namespace, name))
        if event is not None:
            event.set()

    def ensure_loop(self, body: kopf.Body, logger: logging.Logger | logging.LoggerAdapter,
                    jobs_index: Mapping[Any, Any], pods_index: Mapping[Any, Any]) -> None:
        """Start the job's loop, or hand the running one the job as it is now."""
        key = (body.metadata.namespace, body.metadata.name)
        loop = self.loops.get(key)
        if loop is not None and not loop.task.done():
            spec_changed = body.metadata.get("generation") != loop.body.metadata.get("generation")
            loop.body = body
            if spec_changed:  # not for the loop's own status writes, which come back as events too
                self.wake(*key)
            return
        loop = JobLoop(self, body, logger, jobs_index, pods_index)
        loop.task = asyncio.create_task(loop.run(), name=f"purification {key[0]}/{key[1]}")
        self.loops[key] = loop

    async def stop_loop(self, namespace: str, name: str) -> None:
        loop = self.loops.pop((namespace, name), None)
        if loop is not None:
            await loop.stop()

    async def stop_all(self) -> None:
        for key in list(self.loops):
            await self.stop_loop(*key)


class JobLoop:
    def __init__(self, runtime: OperatorRuntime, body: kopf.Body, logger: logging.Logger | logging.LoggerAdapter,
                 jobs_index: Mapping[Any, Any], pods_index: Mapping[Any, Any]):
        self.rt, self.body, self.logger = runtime, body, logger
        self.jobs_index, self.pods_index = jobs_index, pods_index
        self.namespace, self.name = body.metadata.namespace, body.metadata.name
        self.status = read_status(body.get("status"))
        self.validated = any(s.attempts for s in self.status.stages)  # a job that ran before was valid
        self.store: Optional[RunStore] = None
        self.workload: Optional[dict] = None  # a queued run's Kueue Workload, as last read
        self.admission: Optional[Admission] = None  # and what it says (its flavors' placement when admitted)
        self.next_progress_read = 0.0
        self.memory_floors: dict[StageName, float] = {}  # the planner's per-stage floors, found at validation
        self.wake = runtime.wakeups.setdefault((self.namespace, self.name), asyncio.Event())
        self.stopped = asyncio.Event()
        self.task: Optional[asyncio.Task] = None

    async def stop(self, timeout: float = 5.0) -> None:
        """Finish the current pass (its effects are in flight), then end; cancel it past `timeout`."""
        self.stopped.set()
        self.wake.set()
        if self.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.task), timeout)
            except asyncio.TimeoutError:
                self.task.cancel()

    async def run(self) -> None:
        stopped = self.stopped
        try:
            while not stopped.is_set():
                started = time.perf_counter()
                self.rt.metrics.handler_runs.inc()
                try:
                    delay = await self.tick()
                except Exception as exc:  # noqa: BLE001 - one job's failure must not stop its loop
                    self.rt.metrics.handler_errors.labels(type(exc).__name__).inc()
                    self.logger.warning("reconcile failed, retrying in %.0fs: %s", ERROR_BACKOFF, exc)
                    delay = ERROR_BACKOFF
                finally:
                    self.rt.metrics.handler_latency.observe(time.perf_counter() - started)
                await self._sleep(delay, stopped)
        finally:
            self.rt.wakeups.pop((self.namespace, self.name), None)

    async def _sleep(self, seconds: float, stopped: asyncio.Event) -> None:
        """Until `seconds` pass, a child Job changes, or the loop is asked to stop."""
        deadline = time.monotonic() + seconds
        while not stopped.is_set() and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                break
            except asyncio.TimeoutError:
                continue
        self.wake.clear()

    async def tick(self) -> float:
        """One pass; returns seconds until the next."""
        now = datetime.now(timezone.utc)
        generation = int(self.body.metadata.get("generation") or 1)
        if self.status.phase.finished:
            # Nothing changes a finished job's outcome, but a later spec edit (suspend) is still
            # acknowledged, so GitOps tools do not wait for it forever; past its time to live it goes.
            try:
                job: Optional[PurificationJob] = effective_job(self.body, self.rt.config)
            except InvalidSpec:
                job = None  # a spec that does not parse keeps its job (no TTL to trust)
            plan = reconcile(job, self.status, generation, Observation(now=now, admission=await self._admission()))
            await self._apply(plan, job=None)
            if plan.expired:
                await self._delete_self()
                return FINISHED_INTERVAL
            return min(FINISHED_INTERVAL, plan.requeue_after) if plan.requeue_after is not None else FINISHED_INTERVAL
        try:
            job = effective_job(self.body, self.rt.config)
            if not self.validated:
                await self._validate(job)
            if self.store is None:
                self.store = await self._open_store(job)
        except InvalidSpec as exc:
            await self._apply(reject(self.status, str(exc), generation, now), job=None)
            return FINISHED_INTERVAL
        ended, pending, started = self._pods()
        annotations = self.body.metadata.get("annotations") or {}
        observed = Observation(now=now, children=self._children(), pods=ended, pending=pending, started=started,
                               progress=await self._progress(job),
                               follow_image_tag=annotations.get(ANNOTATION_RUNNER_IMAGE) == FOLLOW_IMAGE_TAG,
                               admission=await self._admission(), memory_floors=self.memory_floors)
        config = self.rt.config
        plan = reconcile(job, self.status, generation, observed, config.backoff, config.pending_threshold)
        # A round's audit decides the next round; the kept round's figures end the run. Each read is
        # followed by a reconcile on it, and a pass reads at most one file per round plus the figures.
        for _ in range(job.spec.rounds.max_rounds + 1):
            if plan.wants_audit is not None:
                read = functools.partial(self.store.audit, plan.wants_audit)
                audits = observed.audits
                try:
                    observed = dataclasses.replace(observed, audits={**audits, plan.wants_audit: await
                                                                     asyncio.to_thread(read)})
                except ArtifactsTampered as exc:
                    observed = dataclasses.replace(observed, tampered=str(exc))
            elif plan.wants_metrics:
                read = functools.partial(self.store.metrics, kept_round(plan.status))
                try:
                    observed = dataclasses.replace(observed, metrics=await asyncio.to_thread(read))
                except ArtifactsTampered as exc:
                    observed = dataclasses.replace(observed, tampered=str(exc))
            else:
                break
            plan = reconcile(job, self.status, generation, observed, config.backoff, config.pending_threshold)
        await self._apply(plan, job)
        if plan.status.phase.finished:
            return 0.0  # the next pass, a finished job's, times its deletion when it has a TTL
        interval = self.rt.config.reconcile_interval
        return min(interval, plan.requeue_after) if plan.requeue_after is not None else interval

    async def _admission(self) -> Optional[Admission]:
        """A queued run's Workload as Kueue left it (None for a run without a queue or a Workload);
        admitted, with its flavors' node labels and tolerations."""
        self.workload, self.admission = None, None
        labels = self.body.metadata.get("labels") or {}
        if QUEUE_LABEL not in labels or not self.rt.config.kueue:
            return None
        kube = self.rt.kube
        name = workload_name(self.name, self.body.metadata.get("uid"))
        self.workload = await asyncio.to_thread(kube.workload, self.namespace, name)
        if self.workload is None:
            return None
        admission = admission_of(self.workload)
        if admission.state is AdmissionState.ADMITTED:
            flavors = [await asyncio.to_thread(kube.resource_flavor, flavor) for flavor in admission.flavors]
            admission = with_flavors(admission, [f for f in flavors if f is not None])
        self.admission = admission
        return admission

    async def _validate(self, job: PurificationJob) -> None:
        if queue_name(job) is not None and not self.rt.config.kueue:
            raise InvalidSpec(f"metadata.labels[{QUEUE_LABEL}]: this operator runs no queued jobs; install its "
                              "chart with kueue.enabled=true (and Kueue) to queue runs")
        if queue_name(job) is not None and priority_class(job) is not None and \
                await asyncio.to_thread(self.rt.kube.workload_priority, priority_class(job)) is None:
            raise InvalidSpec(f"metadata.labels[{PRIORITY_LABEL}]: no Kueue WorkloadPriorityClass "
                              f"{priority_class(job)!r}")
        check_static(job)
        check_policy(job, self.rt.config.credential_namespaces, self.rt.config.forbid_unsafe_pickle,
                     self.rt.config.allowed_endpoints)
        data = await read_credentials(self.rt, job)
        signing = job.spec.provenance.signing_key_secret
        signing_exists = None if signing is None else \
            await asyncio.to_thread(self.rt.kube.secret_exists, job.metadata.namespace, signing.name)
        check_cluster(job, ClusterFacts(secret_keys=None if data is None else frozenset(data),
                                        signing_secret_exists=signing_exists))
        self.store = await self._open_store(job, data)
        try:
            files = await asyncio.to_thread(self.store.model_files)
            check_cluster(job, ClusterFacts(secret_keys=frozenset(data), model_files=files,
                                            signing_secret_exists=signing_exists))
            # Only now is there a config.json to read: the family must be one the runner loads.
            model_config = await asyncio.to_thread(self.store.model_config)
        except StoreError as exc:  # permanent: access denied, bad bucket name
            raise InvalidSpec(f"spec.model.uri: {exc}") from None
        # StoreUnavailableError propagates: the next pass validates again.
        model_type = model_config if isinstance(model_config, ConfigProblem) else model_config.get("model_type")
        check_cluster(job, ClusterFacts(secret_keys=frozenset(data), model_files=files, model_type=model_type,
                                        signing_secret_exists=signing_exists))
        # A batch that cannot fit the cluster's GPUs even at the shortest rows is refused now, not
        # in its first GPU pod; the floors go into status either way.
        floors = stage_floors(job, model_config, self.rt.config.runner.gpus) if isinstance(model_config, dict) else []
        check_floors(floors, self.rt.config.runner.gpu_memory_gib)
        self.memory_floors = {floor.stage: floor.gib for floor in floors}
        self.validated = True

    async def _open_store(self, job: PurificationJob, data: Optional[dict[str, str]] = None) -> RunStore:
        if data is None:
            data = await read_credentials(self.rt, job) or {}
        return RunStore.from_secret_data(job, data)

    def _children(self) -> dict[str, ChildJob]:
        return {child.name: child for child in self.jobs_index.get((self.namespace, self.name), [])}

    def _pods(self) -> tuple[dict[str, list[PodOutcome]], dict[str, list[PendingPod]], dict[str, list[StartedPod]]]:
        """The stage pods' outcomes, the pods still Pending and those running, by Job name."""
        ended: dict[str, list[PodOutcome]] = {}
        pending: dict[str, list[PendingPod]] = {}
        started: dict[str, list[StartedPod]] = {}
        for job_name in self._children():
            seen = list(self.pods_index.get((self.namespace, job_name), []))
            ended[job_name] = [p for p in seen if isinstance(p, PodOutcome)]
            pending[job_name] = [p for p in seen if isinstance(p, PendingPod)]
            started[job_name] = [p for p in seen if isinstance(p, StartedPod)]
        return ended, pending, started

    async def _progress(self, job: PurificationJob):
        """progress.json, read at most every progress_interval while a stage runs."""
        running = any(s.phase is StagePhase.RUNNING for s in self.status.stages)
        if not running or time.monotonic() < self.next_progress_read:
            return None
        self.next_progress_read = time.monotonic() + self.rt.config.progress_interval
        try:
            current = next((s for s in self.status.stages if s.phase is StagePhase.RUNNING), None)
            return await asyncio.to_thread(self.store.progress, current.round if current else 1)
        except (StoreError, StoreUnavailableError) as exc:
            self.logger.warning("progress not readable: %s", exc)
            return None

    async def _apply(self, plan: Plan, job: Optional[PurificationJob]) -> None:
        if self.rt.leadership is not None and not self.rt.leadership.leading:
            return  # lost the Lease: another replica may lead by now, so nothing is written
        kube = self.rt.kube
        old = self.status
        if plan.status != old:
            await asyncio.to_thread(kube.patch_status, self.namespace, self.name, plan.status.to_wire())
            self.status = plan.status
        for name in plan.delete:
            await asyncio.to_thread(kube.delete_job, self.namespace, name)
        if plan.workload is not None:
            await self._workload_action(plan, job)
        for create in plan.create:
            assert job is not None
            if finetune_nodes(job, create.stage) > 1:  # its pods find each other through this Service
                await asyncio.to_thread(kube.create_service, rendezvous_service(job))
            manifest = stage_job(job, create.stage, create.step, create.attempt, self.rt.config.runner,
                                 pinned_image=plan.status.runner_image, admission=self.admission,
                                 round_number=create.round)
            created = await asyncio.to_thread(kube.create_job, manifest)
            if created:
                self.logger.info("created Job %s", manifest["metadata"]["name"])
        for event in plan.events:
            kopf.event(self.body, type=event.type.value, reason=event.reason.value, message=event.message)
        self._record_metrics(old, plan)

    async def _workload_action(self, plan: Plan, job: Optional[PurificationJob]) -> None:
        kube, action, now = self.rt.kube, plan.workload, datetime.now(timezone.utc)
        if action is WorkloadAction.CREATE:
            assert job is not None
            name = priority_class(job)
            priority = None if name is None else await asyncio.to_thread(kube.workload_priority, name)
            if name is not None and priority is None:
                return  # deleted since the job was validated: the next pass tries again
            manifest = run_workload_manifest(job, self.rt.config.runner, priority)
            if await asyncio.to_thread(kube.create_workload, manifest):
                self.logger.info("created Workload %s in Kueue queue %s", workload_name(self.name, job.metadata.uid),
                                 queue_name(job))
            return
        if self.workload is None:
            return
        if action is WorkloadAction.DELETE:
            await asyncio.to_thread(kube.delete_workload, self.namespace, self.workload["metadata"]["name"])
        elif action is WorkloadAction.RELEASE:
            await asyncio.to_thread(kube.replace_workload_status, self.workload, released_status(self.workload, now))
        elif action is WorkloadAction.FINISH:
            status = finished_status(self.workload, plan.status.phase is JobPhase.SUCCEEDED, plan.status.message, now)
            await asyncio.to_thread(kube.replace_workload_status, self.workload, status)

    async def _delete_self(self) -> None:
        """Delete this finished job (its time to live is over); only the object seen, by uid, so a
        job re-created under the same name is not. Its stage Jobs go with it (owner references)."""
        if self.rt.leadership is not None and not self.rt.leadership.leading:
            return
        uid = self.body.metadata.get("uid")
        if await asyncio.to_thread(self.rt.kube.delete_purification_job, self.namespace, self.name, uid):
            self.logger.info("deleted: finished %s ago, policy.ttlSecondsAfterFinished has passed",
                             _since(self.status))
        self.stopped.set()

    def _record_metrics(self, old: PurificationJobStatus, plan: Plan) -> None:
        metrics, new = self.rt.metrics, plan.status
        metrics.set_phase(self.namespace, self.name, new.phase)
        for stage, kind in plan.retries:
            metrics.stage_retries.labels(stage.value, kind.value).inc()
        previous = {(s.name, s.round): s.phase for s in old.stages}
        for stage in new.stages:
            finished = stage.phase in (StagePhase.SUCCEEDED, StagePhase.FAILED)
            if finished and previous.get((stage.name, stage.round)) != stage.phase and stage.completion_time:
                start = stage.start_time or stage.completion_time
                metrics.stage_finished(stage.name, stage.phase is StagePhase.SUCCEEDED,
                                       (stage.completion_time - start).total_seconds())
                if stage.phase is StagePhase.FAILED:
                    reason = plan.failure_reason.value if plan.failure_reason else "Unknown"
                    metrics.stage_failures.labels(stage.name.value, reason).inc()
        if new.phase.finished:
            metrics.set_outcome(self.namespace, self.name, new.metrics)
            metrics.set_round(self.namespace, self.name, kept_round(new))
            verdict = new.condition(ConditionType.BACKDOOR_REMOVED)
            metrics.set_verdict(self.namespace, self.name, None if verdict is None or
                                verdict.status is ConditionStatus.UNKNOWN else verdict.status is ConditionStatus.TRUE)
            if new.phase is JobPhase.FAILED and old.phase is not JobPhase.FAILED:
                failed = new.condition(ConditionType.FAILED)
                metrics.job_failed(failed.reason if failed else Reason.STAGE_FAILED)
        elif new.phase is JobPhase.RUNNING:
            metrics.set_round(self.namespace, self.name, new.progress.current_round or 1)
            updated = new.progress.last_update_time
            metrics.set_progress(self.namespace, self.name, new.progress.percent / 100,
                                 updated.timestamp() if updated else time.time())
            metrics.set_pending(self.namespace, self.name, plan.holdup.pending_seconds if plan.holdup else 0.0)
        else:
            metrics.set_waiting(self.namespace, self.name)


def _since(status: PurificationJobStatus) -> str:
    finished = finished_at(status)
    return f"{(datetime.now(timezone.utc) - finished).total_seconds():.0f}s" if finished else "a while"


def effective_job(body: Mapping[str, Any], config: OperatorConfig) -> PurificationJob:
    """The typed job, with the operator's default S3 (the chart's values) when the spec names none;
    the stage pods get this same spec."""
    job = parse_job(body)
    if job.spec.storage is None and config.default_storage is not None:
        job = job.model_copy(update={"spec": job.spec.model_copy(update={"storage": config.default_storage})})
    return job


def read_status(raw: Optional[Mapping[str, Any]]) -> PurificationJobStatus:
    """The status this operator wrote before a restart; anything else (kopf's own bookkeeping, an
    edited or foreign status) starts the job's record afresh: the runner skips completed stages."""
    if not raw:
        return PurificationJobStatus()
    try:
        return PurificationJobStatus.model_validate({k: v for k, v in raw.items() if k in _STATUS_KEYS})
    except ValidationError:
        return PurificationJobStatus()


_STATUS_KEYS = {to_camel(name) for name in PurificationJobStatus.model_fields}


async def read_credentials(runtime: OperatorRuntime, job: PurificationJob) -> Optional[dict[str, str]]:
    """A job's credentials Secret (None when it does not exist), read only in the namespaces the
    operator may read Secrets in (InvalidSpec otherwise: the chart grants no more)."""
    check_policy(job, runtime.config.credential_namespaces, forbid_unsafe_pickle=False,
                 allowed_endpoints=runtime.config.allowed_endpoints)
    return await asyncio.to_thread(runtime.kube.secret_data, job.metadata.namespace,
                                   job.spec.storage.credentials_secret.name)
