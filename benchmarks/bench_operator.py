"""How the operator copes with a burst: N PurificationJobs created at once against a real
Kubernetes control plane on loopback (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
as built by `make k8s`) and a loopback MinIO server (also `make k8s`). The operator runs as its own process
(`disp-operator`), exactly as in its container; no node runs the stage pods, so the figure is the
operator's own work (and the API server's): validate each job (Secret lookup, model listing in
S3), write its status, create its first stage Job.

Prints the time from the first create until every first-stage Job exists, per-job latency
percentiles, and the operator process's peak resident memory (VmHWM).

    .venv/bin/python benchmarks/bench_operator.py [--jobs 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from disp_store.s3 import S3Store  # noqa: E402
from tests.harness.cluster import Cluster, install_crd  # noqa: E402
from tests.harness.controlplane import free_port, running_control_plane  # noqa: E402
from tests.harness.minio import S3_ACCESS as ACCESS, S3_SECRET as SECRET, MinioServer  # noqa: E402
from tests.harness.tools import build_cluster_tools  # noqa: E402
from tests.jobs import job_document  # noqa: E402


def manifest(name: str, namespace: str, endpoint: str) -> dict:
    return job_document({"model": {"uri": "s3://models/m"}, "dataset": {"uri": "s3://data/train"},
                         "output": {"uri": "s3://runs"},
                         "storage": {"endpoint": endpoint, "secure": False, "credentialsSecret": {"name": "minio"}}},
                        name, namespace)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    s3 = MinioServer(build_cluster_tools() / "minio", workdir / "minio").start()
    endpoint = s3.endpoint
    store = S3Store(endpoint, ACCESS, SECRET, secure=False)
    for bucket in ("models", "runs"):
        store.client.make_bucket(bucket)
    store.put_bytes("models", "m/config.json", b"{}")
    store.put_bytes("models", "m/model.safetensors", b"weights")

    with running_control_plane(workdir / "control-plane") as plane:
        install_crd(plane)
        run(args, plane, endpoint, workdir)
    s3.stop()


def run(args: argparse.Namespace, plane, endpoint: str, workdir: Path) -> None:
    cluster = Cluster(plane, "bench")
    namespace = cluster.namespace
    cluster.apply_secret(namespace, "minio", {"accessKey": ACCESS, "secretKey": SECRET})
    liveness = free_port()
    # A cluster admin's credentials: the figure is the operator's work, not RBAC's.
    env = {**os.environ, "KUBECONFIG": str(plane.admin_kubeconfig), "DISP_METRICS_PORT": "0"}
    log = (workdir / "operator.log").open("w")
    operator = subprocess.Popen([str(Path(sys.executable).with_name("disp-operator")), "--liveness-port",
                                 str(liveness)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:  # ready: kopf answers its liveness probe once it watches
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or operator.poll() is not None:
                    raise SystemExit(f"operator did not start; see {workdir / 'operator.log'}")
                time.sleep(0.2)
        rss_idle = peak_rss_mib(operator.pid)

        names = [f"job-{i:04d}" for i in range(args.jobs)]
        created_at: dict[str, float] = {}

        def create(name: str) -> None:
            cluster.create_job(manifest(name, namespace, endpoint))
            created_at[name] = time.monotonic()

        start = time.monotonic()
        with ThreadPoolExecutor(8) as pool:  # as fast as the API server takes them
            list(pool.map(create, names))
        all_created = time.monotonic() - start
        seen_at: dict[str, float] = {}
        while len(seen_at) < len(names) and time.monotonic() - start < args.timeout:
            now = time.monotonic()
            for job in cluster.batch.list_namespaced_job(namespace).items:
                owner = job.metadata.name.removesuffix("-saliency")
                if job.metadata.name.endswith("-saliency") and owner not in seen_at:
                    seen_at[owner] = now
            time.sleep(0.1)
        elapsed = time.monotonic() - start
        if len(seen_at) < len(names):
            raise SystemExit(f"only {len(seen_at)} of {len(names)} first-stage Jobs after {elapsed:.0f}s")
        latencies = sorted(seen_at[n] - created_at[n] for n in names)
        rss_peak = peak_rss_mib(operator.pid)
    finally:
        operator.terminate()
        operator.wait(30)
        cluster.close()
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(f"jobs created                         {args.jobs} in {all_created:.1f}s")
    print(f"every first-stage Job exists after    {elapsed:.1f}s from the first create")
    print(f"create -> Job latency                 median {statistics.median(latencies):.2f}s, "
          f"p95 {p95:.2f}s, max {latencies[-1]:.2f}s")
    print(f"operator peak RSS                     {rss_peak:.0f} MiB (idle before the burst: {rss_idle:.0f} MiB, "
          f"{(rss_peak - rss_idle) / args.jobs * 1024:.0f} KiB per job)")


if __name__ == "__main__":
    main()
