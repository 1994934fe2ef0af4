"""Failover of two operator replicas: the leader killed (SIGKILL, as a crashed pod) while a stage runs.

    .venv/bin/python benchmarks/bench_failover.py            # 5 runs, the chart's timings
    .venv/bin/python benchmarks/bench_failover.py --runs 10 --lease 15 --renew-deadline 10 --retry 2

Everything is the test suite's real infrastructure (tests/harness): the control plane and kubectl
built by `make k8s`, a MinIO server, the node agent running the stand-in runner in the stage pods,
and the chart's ServiceAccount and RBAC. Two `disp-operator` processes run with the chart
Deployment's arguments and environment. Each run: a job whose relabel stage takes `--stage-seconds`;
once its pod has started, the leader is killed. Printed per run and summarised: seconds from the
kill until the other replica leads (the Lease), and until it creates the run's next stage Job; the
number of Jobs made per stage (1 = no duplicate).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from disp_store.s3 import S3Store  # noqa: E402
from tests.conftest import NODES  # noqa: E402
from tests.e2e.support import CREDENTIALS_SECRET, Replica, finished, install, standin_manifest, wait_until  # noqa: E402
from tests.harness.cluster import Cluster, install_crd  # noqa: E402
from tests.harness.controlplane import running_control_plane  # noqa: E402
from tests.harness.minio import S3_ACCESS, S3_SECRET, MinioServer  # noqa: E402
from tests.harness.node_agent import NodeAgent  # noqa: E402
from tests.harness.tools import build_cluster_tools  # noqa: E402

STAGES = ("saliency", "masking", "relabel", "finetune", "evaluate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lease", type=float, default=15.0, help="DISP_LEADER_LEASE_SECONDS (chart: 15)")
    parser.add_argument("--renew-deadline", type=float, default=10.0, help="DISP_LEADER_RENEW_DEADLINE_SECONDS (10)")
    parser.add_argument("--retry", type=float, default=2.0, help="DISP_LEADER_RETRY_SECONDS (2)")
    parser.add_argument("--stage-seconds", type=float, default=5.0, help="how long the relabel stage runs")
    args = parser.parse_args()
    settings = {"DISP_LEADER_LEASE_SECONDS": str(args.lease),
                "DISP_LEADER_RENEW_DEADLINE_SECONDS": str(args.renew_deadline),
                "DISP_LEADER_RETRY_SECONDS": str(args.retry), "DISP_RECONCILE_INTERVAL_SECONDS": "0.5",
                "DISP_PROGRESS_INTERVAL_SECONDS": "0.5", "DISP_RETRY_BASE_SECONDS": "0.2"}
    work = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    s3 = MinioServer(build_cluster_tools() / "minio", work / "minio").start()
    store = S3Store(s3.endpoint, S3_ACCESS, S3_SECRET, secure=False)
    for bucket in ("models", "data", "runs"):
        store.client.make_bucket(bucket)
    store.put_bytes("models", "bench/model/config.json", b"{}")
    store.put_bytes("models", "bench/model/model.safetensors", b"weights")
    rows = []
    try:
        with running_control_plane(work / "control-plane") as plane:
            install_crd(plane)
            agent = NodeAgent(plane, work / "nodes", NODES)
            cluster = Cluster(plane, "bench")
            try:
                cluster.apply_secret(cluster.namespace, CREDENTIALS_SECRET,
                                     {"accessKey": S3_ACCESS, "secretKey": S3_SECRET})
                chart = install(cluster)
                for run in range(args.runs):
                    rows.append(one_run(run, cluster, agent, chart, s3.endpoint, work, settings, args.stage_seconds))
                    print(f"run {run + 1}: lead after {rows[-1][0]:.2f} s, next Job after {rows[-1][1]:.2f} s, "
                          f"Jobs per stage {rows[-1][2]}", flush=True)
            finally:
                cluster.close()
                agent.close()
    finally:
        s3.stop()
    leads, nexts = [r[0] for r in rows], [r[1] for r in rows]
    print(f"\nlease {args.lease:g} s, renew deadline {args.renew_deadline:g} s, retry {args.retry:g} s; "
          f"{args.runs} runs; relabel stage {args.stage_seconds:g} s")
    print(f"kill -> other replica leads     median {statistics.median(leads):.2f} s, "
          f"min {min(leads):.2f} s, max {max(leads):.2f} s")
    print(f"kill -> next stage Job created  median {statistics.median(nexts):.2f} s, "
          f"min {min(nexts):.2f} s, max {max(nexts):.2f} s")
    print(f"duplicate Jobs                  {sum(sum(c - 1 for c in r[2].values()) for r in rows)}")


def one_run(run: int, cluster: Cluster, agent: NodeAgent, chart, endpoint: str, work: Path,
            settings: dict[str, str], stage_seconds: float) -> tuple[float, float, dict[str, int]]:
    name = f"fo{run}"
    folder = work / name
    folder.mkdir()
    replicas = [Replica.start(chart, f"disp-operator-{name}-a", folder, settings)]
    try:
        wait_until(replicas[0].leads, 120, "the first replica to lead")
        replicas.append(Replica.start(chart, f"disp-operator-{name}-b", folder, settings))
        wait_until(replicas[1].healthy, 60, "the second replica to wait")
        agent.standin_seconds = stage_seconds
        cluster.create_job(standin_manifest(endpoint, "bench", cluster.namespace, name))
        wait_until(lambda: (cluster.namespace, f"{name}-relabel") in agent.started, 120, "the relabel pod")
        agent.standin_seconds = 0.3
        replicas[0].kill()
        killed = time.monotonic()
        wait_until(replicas[1].leads, 120, "the other replica to lead")
        lead = time.monotonic() - killed
        wait_until(lambda: any(j["metadata"]["name"] == f"{name}-finetune" for j in cluster.jobs(cluster.namespace)),
                   120, "the next Job")
        next_job = time.monotonic() - killed
        body = cluster.wait_for(cluster.namespace, name, finished, 120, "the job to finish")
        assert body["status"]["phase"] == "Succeeded", body["status"]
    finally:
        for replica in replicas:
            replica.stop()
    started = [job for namespace, job in agent.started if namespace == cluster.namespace and
               job.startswith(f"{name}-")]
    # attempts and re-creations of a stage would be named <job>-<stage>-2, …: counted with it
    return lead, next_job, {stage: sum(job.startswith(f"{name}-{stage}") for job in started) for stage in STAGES}


if __name__ == "__main__":
    main()
