"""The kopf handlers: thin wiring from Kubernetes events to the service (service.py) and the pure
decisions behind it (reconcile.py). Run with `disp-operator` or `kopf run -m disp_operator.handlers`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from typing import Any

import kopf
import kubernetes
from prometheus_client import start_http_server

from disp_operator.artifacts import RunStore
from disp_operator.children import ChildJob, PendingPod, PodOutcome, StartedPod
from disp_operator.config import LeaderElectionConfig, OperatorConfig
from disp_operator.kube import KubeApi, client_configuration
from disp_operator.leadership import LeaderElector, identity, serve_standby_health
from disp_operator.metrics import OperatorMetrics
from disp_operator.naming import GROUP, LABEL_JOB, LABEL_MANAGED_BY, MANAGED_BY, PLURAL, VERSION
from disp_operator.reconcile import kept_round
from disp_operator.service import OperatorRuntime, effective_job, read_credentials, read_status
from disp_operator.validation import InvalidSpec

OURS = {LABEL_MANAGED_BY: MANAGED_BY}
RUNTIME_KEY = "disp_runtime"  # in kopf's memo
LIVENESS_PORT_ENV = "DISP_LIVENESS_PORT"  # set by disp-operator (__main__) from --liveness-port


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # The pod's service account in a cluster, $KUBECONFIG elsewhere: the same as our own client.
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    # One replica reconciles at a time: leader election (below) when the chart runs two, so kopf's
    # own peering stays off.
    settings.peering.standalone = True
    # kopf's own bookkeeping goes to annotations: status belongs to the PurificationJob's users.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.disp.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kopf.disp.dev")
    # Watches that silently stop delivering (a proxy dropped the stream) are restarted.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.inactivity_timeout = 600
    # No cluster-wide scanning of CRDs and namespaces: the chart installs the CRD before the
    # operator starts and names the namespaces to watch, so the operator needs no cluster-scoped
    # read access at all (least privilege; see the chart's RBAC).
    settings.scanning.disabled = True
    settings.posting.level = logging.WARNING  # Events come from our transitions, not from every log line
    config = OperatorConfig.from_env()
    metrics = OperatorMetrics()
    kube = KubeApi(client_configuration())
    runtime = OperatorRuntime(config=config, kube=kube, metrics=metrics)
    if config.metrics_port:
        runtime.metrics_server, _ = start_http_server(config.metrics_port, registry=metrics.registry)
        logger.info("metrics on :%d/metrics", config.metrics_port)
    memo[RUNTIME_KEY] = runtime
    if config.leader_election is not None:
        # kopf starts watching only when the startup handlers have returned: until this replica
        # leads it watches nothing, reconciles nothing and exports no job series.
        await lead(runtime, config.leader_election, logger)
    metrics.leader.set(1)


async def lead(runtime: OperatorRuntime, election: LeaderElectionConfig, logger: logging.Logger) -> None:
    elector = LeaderElector(kubernetes.client.CoordinationV1Api(runtime.kube.client), election.namespace,
                            election.lease_name, identity(), duration=election.lease_seconds,
                            renew_deadline=election.renew_deadline_seconds, retry=election.retry_seconds)
    runtime.leadership = elector
    liveness_port = int(os.environ.get(LIVENESS_PORT_ENV) or 0)
    standby = serve_standby_health(liveness_port) if liveness_port else None
    logger.info("waiting to lead (Lease %s/%s, as %s)", election.namespace, election.lease_name, elector.me)
    try:
        await elector.campaign()
    finally:
        if standby is not None:
            standby.shutdown()
            standby.server_close()

    def lost() -> None:
        runtime.metrics.leader.set(0)
        # The container restarts and campaigns again. In the operator's own process (kopf in the
        # main thread) SIGTERM is kopf's graceful stop; run in-process by a test, writes stay fenced.
        if threading.current_thread() is threading.main_thread():
            os.kill(os.getpid(), signal.SIGTERM)

    runtime.leadership_task = asyncio.create_task(elector.keep(lost), name="leader election")


@kopf.on.probe(id="jobs")
def probe(memo: kopf.Memo, **_: Any) -> int:
    """Liveness/readiness (kopf's --liveness endpoint): the number of jobs being reconciled."""
    return len(memo[RUNTIME_KEY].wakeups)


@kopf.index("batch", "v1", "jobs", labels=OURS)
def stage_jobs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, labels[LABEL_JOB]): ChildJob.from_job(body)}


@kopf.index("", "v1", "pods", labels=OURS)
def stage_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict:
    """Each stage pod's outcome once it ended, what holds it while it is Pending, or the image it
    runs once started."""
    job_name = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
    seen = PodOutcome.from_pod(body) or PendingPod.from_pod(body) or StartedPod.from_pod(body)
    return {(namespace, job_name): seen} if job_name and seen else {}


@kopf.on.event("", "v1", "pods", labels=OURS)
def stage_pod_changed(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    # A pod the scheduler turns down changes no Job: wake the job's loop to say so at once.
    job = labels.get(LABEL_JOB)
    if job:
        memo[RUNTIME_KEY].wake(namespace, job)


@kopf.on.event("batch", "v1", "jobs", labels=OURS)
def stage_job_changed(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    memo[RUNTIME_KEY].wake(namespace, labels[LABEL_JOB])


@kopf.on.event(GROUP, VERSION, PLURAL)
async def purification(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                       stage_jobs: kopf.Index, stage_pods: kopf.Index, **_: Any) -> None:
    """Every job seen (at startup too) gets its reconcile loop; a deleted one loses it. No finalizer."""
    runtime: OperatorRuntime = memo[RUNTIME_KEY]
    namespace, name = body.metadata.namespace, body.metadata.name
    if event["type"] == "DELETED" or body.metadata.get("deletionTimestamp"):
        await runtime.stop_loop(namespace, name)
        if event["type"] == "DELETED":
            runtime.metrics.forget(namespace, name)
        return
    runtime.ensure_loop(body, logger, stage_jobs, stage_pods)


def _cleans_up(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("policy") or {}).get("cleanupArtifacts"))


# Only a job that asks for its intermediates to be deleted carries a finalizer (this handler's),
# so that deleting it while no operator runs waits for one and the clean-up still happens; every
# other job is deleted at once, operator or not.
@kopf.on.delete(GROUP, VERSION, PLURAL, when=_cleans_up)
async def deleted(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Stage Jobs go with their owner (ownerReferences); the run's intermediates go too."""
    runtime: OperatorRuntime = memo[RUNTIME_KEY]
    await runtime.stop_loop(body.metadata.namespace, body.metadata.name)
    runtime.metrics.forget(body.metadata.namespace, body.metadata.name)
    try:
        job = effective_job(body, runtime.config)
    except InvalidSpec:
        return  # it never ran
    if job.spec.storage is None:
        return
    try:
        data = await read_credentials(runtime, job)
    except InvalidSpec as exc:
        logger.warning("artifacts of %s not cleaned up: %s", job.run_uri(), exc)
        return
    if data is None:
        logger.warning("artifacts of %s not cleaned up: credentials Secret gone", job.run_uri())
        return
    store = RunStore.from_secret_data(job, data)
    kept = kept_round(read_status(body.get("status")))  # the purified model the run published
    deleted_count = await asyncio.to_thread(store.delete_intermediates, kept)
    logger.info("deleted %d intermediate artifacts of %s (the purified model is kept)", deleted_count, job.run_uri())
