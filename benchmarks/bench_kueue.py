"""What a queued run costs in Kueue: admissions per run, and the wait between its stages when
another team's workload queues behind it (the chart's kueue.enabled: one Workload per run).

    .venv/bin/python benchmarks/bench_kueue.py               # 3 runs, competitor holds the quota 10 s

The real Kueue controller manager (built by `make k8s`) on the test suite's control plane, node
agent and MinIO (tests/harness); one `disp-operator` process with the chart's settings. The
ClusterQueue has room for one stage pod. Each run: a PurificationJob whose stages take
`--stage-seconds` each; while its first stage runs, a competing workload of the same size is queued;
it holds the quota `--hold` seconds once admitted. Printed: the run's Kueue admissions, whether
the competitor was admitted before the run ended, and the run's longest gap between one stage
ending and the next starting.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import kubernetes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from disp_store.s3 import S3Store  # noqa: E402
from tests.conftest import NODES  # noqa: E402
from tests.e2e.support import (CREDENTIALS_SECRET, Replica, chart_values, finished, install,  # noqa: E402
                               standin_manifest, wait_until)
from tests.harness.cluster import Cluster, install_crd  # noqa: E402
from tests.harness.controlplane import running_control_plane  # noqa: E402
from tests.harness.kueue import KUEUE_API, KueueManager  # noqa: E402
from tests.harness.minio import S3_ACCESS, S3_SECRET, MinioServer  # noqa: E402
from tests.harness.node_agent import NodeAgent  # noqa: E402
from tests.harness.tools import toolbox  # noqa: E402

GROUP, VERSION = KUEUE_API.split("/")
STAGES = ("saliency", "masking", "relabel", "finetune", "evaluate")
SETTINGS = {"DISP_RECONCILE_INTERVAL_SECONDS": "0.5", "DISP_PROGRESS_INTERVAL_SECONDS": "0.5",
            "DISP_RETRY_BASE_SECONDS": "0.2", "DISP_LEADER_LEASE_SECONDS": "4",
            "DISP_LEADER_RENEW_DEADLINE_SECONDS": "3", "DISP_LEADER_RETRY_SECONDS": "0.5"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hold", type=float, default=10.0, help="seconds the competitor holds the quota")
    parser.add_argument("--stage-seconds", type=float, default=2.0)
    parser.add_argument("--strategy", choices=("BestEffortFIFO", "StrictFIFO"), default="BestEffortFIFO",
                        help="the ClusterQueue's queueingStrategy (Kueue's default: BestEffortFIFO)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-kueue-"))
    tools = toolbox()
    s3 = MinioServer(tools.path("minio"), work / "minio").start()
    store = S3Store(s3.endpoint, S3_ACCESS, S3_SECRET, secure=False)
    for bucket in ("models", "data", "runs"):
        store.client.make_bucket(bucket)
    store.put_bytes("models", "bench/model/config.json", b"{}")
    store.put_bytes("models", "bench/model/model.safetensors", b"weights")
    try:
        with running_control_plane(work / "control-plane") as plane:
            install_crd(plane)
            kubernetes.client.CoreV1Api(plane.admin()).create_namespace({"metadata": {"name": "kueue-system"}})
            kueue = KueueManager(plane, tools.path("kueue"), work / "kueue")
            kueue.install_crds(tools.path("kubectl"))
            kueue.start()
            agent = NodeAgent(plane, work / "nodes", NODES)
            cluster = Cluster(plane, "bench")
            objects = kubernetes.client.CustomObjectsApi(plane.admin())
            replica = None
            try:
                queues(objects, cluster.namespace, args.strategy)
                cluster.apply_secret(cluster.namespace, CREDENTIALS_SECRET,
                                     {"accessKey": S3_ACCESS, "secretKey": S3_SECRET})
                replica = Replica.start(install(cluster, chart_values(cluster, kueue={"enabled": True})),
                                        "disp-operator-bench", work, SETTINGS)
                wait_until(replica.leads, 60, "the operator to lead")
                print(f"Kueue {kueue.version}; ClusterQueue {args.strategy}, room for one stage pod; "
                      f"competitor holds it {args.hold:g} s;"
                      f" stages {args.stage_seconds:g} s each")
                for run in range(args.runs):
                    one_run(run, cluster, agent, objects, s3.endpoint, args)
            finally:
                if replica is not None:
                    replica.stop()
                cluster.close()
                agent.close()
                kueue.stop()
    finally:
        s3.stop()


def queues(objects, namespace: str, strategy: str) -> None:
    objects.create_cluster_custom_object(GROUP, VERSION, "resourceflavors", {
        "apiVersion": KUEUE_API, "kind": "ResourceFlavor", "metadata": {"name": "default-flavor"}})
    objects.create_cluster_custom_object(GROUP, VERSION, "clusterqueues", {
        "apiVersion": KUEUE_API, "kind": "ClusterQueue", "metadata": {"name": "bench"},
        "spec": {"namespaceSelector": {}, "queueingStrategy": strategy, "resourceGroups": [{"coveredResources": ["cpu", "memory"], "flavors": [{
            "name": "default-flavor", "resources": [{"name": "cpu", "nominalQuota": "1"},
                                                    {"name": "memory", "nominalQuota": "2Gi"}]}]}]}})
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, "localqueues", {
        "apiVersion": KUEUE_API, "kind": "LocalQueue", "metadata": {"name": "gpu-batch"},
        "spec": {"clusterQueue": "bench"}})


def admitted_at(workload: dict) -> float | None:
    for condition in (workload.get("status") or {}).get("conditions", []):
        if condition["type"] == "Admitted" and condition["status"] == "True":
            return _seconds(condition["lastTransitionTime"])
    return None


def one_run(run: int, cluster: Cluster, agent: NodeAgent, objects, endpoint: str, args) -> None:
    name, competitor = f"run{run}", f"competitor{run}"
    agent.standin_seconds = args.stage_seconds
    doc = standin_manifest(endpoint, "bench", cluster.namespace, name)
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu-batch"}
    cluster.create_job(doc)
    wait_until(lambda: (cluster.namespace, f"{name}-saliency") in agent.started, 120, "the first stage")
    objects.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "workloads", {
        "apiVersion": KUEUE_API, "kind": "Workload", "metadata": {"name": competitor},
        "spec": {"queueName": "gpu-batch", "podSets": [{"name": "main", "count": 1, "template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "c", "image": "other-team",
                                                      "resources": {"requests": {"cpu": "1"}}}]}}}]}})
    # The competitor holds the quota for --hold seconds once Kueue admits it, then finishes.
    released, competitor_admitted = False, None
    while not finished(cluster.get(cluster.namespace, name)):
        if not released:
            held = objects.get_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "workloads", competitor)
            since = admitted_at(held)
            if since is not None and competitor_admitted is None:
                competitor_admitted = since
                print("  the competitor was admitted before the run ended")
            if since is not None and time.time() - since >= args.hold:
                objects.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "workloads", competitor)
                released = True
        time.sleep(0.2)
    if not released:
        held = objects.get_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "workloads", competitor)
        reasons = [c.get("message", "")[:120] for c in (held.get("status") or {}).get("conditions", [])]
        print(f"  the competitor was not admitted while the run lasted ({'; '.join(reasons)})")
        objects.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "workloads", competitor)
    stage_jobs = {j["metadata"]["name"]: j for j in cluster.jobs(cluster.namespace)
                  if j["metadata"]["name"].startswith(f"{name}-")}
    # The run's own Workload (and, from an operator of the per-stage design, its stage Jobs').
    ours = [w for w in objects.list_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "workloads")["items"]
            if (w["metadata"].get("ownerReferences") or [{}])[0].get("name", "") == name
            or (w["metadata"].get("ownerReferences") or [{}])[0].get("name", "").startswith(f"{name}-")]
    spans = []
    for stage in STAGES:
        job = stage_jobs[f"{name}-{stage}"]
        spans.append((job["status"].get("startTime"), job["status"].get("completionTime")))
    gaps = [_seconds(spans[i + 1][0]) - _seconds(spans[i][1]) for i in range(len(spans) - 1)]
    print(f"run {run + 1}: {len(ours)} Kueue admissions for one run; gaps between stages (s): "
          + ", ".join(f"{g:.0f}" for g in gaps) + f"; longest {max(gaps):.0f} s")


def _seconds(stamp: str) -> float:
    """An API timestamp (RFC 3339, whole seconds) as a Unix time."""
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


if __name__ == "__main__":
    main()
