"""The node agent, the one stand-in left in the end-to-end tests, held to what a kubelet does for
the real control plane: its nodes stay Ready through their Leases, the real scheduler binds pods to
them (or says why not), and each bound pod runs and ends with the status a kubelet writes."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import kubernetes
import pytest

from tests.harness.cluster import Cluster
from tests.harness.node_agent import LEASE_NAMESPACE, RUNNER_IMAGE, STANDIN_IMAGE, repository


@pytest.fixture
def cluster(control_plane, node_agent):
    cluster = Cluster(control_plane, "agent")
    yield cluster
    cluster.close()


def pod(cluster: Cluster, name: str, script: str, **container: object) -> dict:
    """A pod of the runner image (whose PATH finds this test run's python) running `script`, which
    finds the termination-message file as $TERMINATION_LOG (a local process sees the host's /dev:
    the agent maps paths in env values and arguments, not inside a script)."""
    body = pod_body(cluster, name, script, **container)
    cluster.core.create_namespaced_pod(cluster.namespace, body)
    return body


def pod_body(cluster: Cluster, name: str, script: str, **container: object) -> dict:
    env = [{"name": "TERMINATION_LOG", "value": "/dev/termination-log"}, *container.pop("env", [])]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": cluster.namespace},
            "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                     "terminationGracePeriodSeconds": 2,
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                     "containers": [{"name": "main", "image": RUNNER_IMAGE, "command": ["python", "-c", script], "env": env,
                                     "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}, **container}]}}


def wait_pod(cluster: Cluster, name: str, predicate, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        current = cluster.client.sanitize_for_serialization(cluster.core.read_namespaced_pod(name, cluster.namespace))
        if predicate(current):
            return current
        assert time.monotonic() < deadline, f"pod {name}: {current.get('status')}"
        time.sleep(0.1)


def terminated(p: dict) -> dict:
    statuses = (p.get("status") or {}).get("containerStatuses") or []
    return (statuses[0].get("state") or {}).get("terminated") or {} if statuses else {}


def test_nodes_are_registered_ready_with_their_capacity_and_renew_their_leases(control_plane, node_agent):
    admin = control_plane.admin()
    core = kubernetes.client.CoreV1Api(admin)
    nodes = {n.metadata.name: n for n in core.list_node().items}
    gpu = nodes["gpu-node-0"]
    assert gpu.status.allocatable["nvidia.com/gpu"] == "1" and gpu.spec.taints[0].key == "nvidia.com/gpu"
    for node in nodes.values():
        ready = next(c for c in node.status.conditions if c.type == "Ready")
        assert ready.status == "True"
    leases = kubernetes.client.CoordinationV1Api(admin)
    before = leases.read_namespaced_lease("cpu-node-0", LEASE_NAMESPACE).spec.renew_time
    time.sleep(6)
    assert leases.read_namespaced_lease("cpu-node-0", LEASE_NAMESPACE).spec.renew_time > before
    # The node lifecycle controller has nothing to say against them: no not-ready taint.
    for node in core.list_node().items:
        assert not [t for t in node.spec.taints or [] if t.key.startswith("node.kubernetes.io/")], node.spec.taints


def test_a_bound_pod_runs_and_ends_with_its_exit_code_and_termination_message(cluster):
    pod(cluster, "ok", "import os; open(os.environ['TERMINATION_LOG'], 'w').write('all done')")
    done = wait_pod(cluster, "ok", lambda p: p["status"].get("phase") == "Succeeded")
    assert done["spec"]["nodeName"] in ("cpu-node-0", "gpu-node-0")  # bound by the real scheduler
    assert terminated(done)["exitCode"] == 0 and terminated(done)["reason"] == "Completed"
    assert terminated(done)["message"] == "all done"
    scheduled = next(c for c in done["status"]["conditions"] if c["type"] == "PodScheduled")
    assert scheduled["status"] == "True"


def test_a_failed_pod_falls_back_to_its_logs_last_lines_only_when_asked(cluster):
    script = "import sys\nfor i in range(200): print('line', i)\nsys.exit(3)"
    pod(cluster, "fallback", script, terminationMessagePolicy="FallbackToLogsOnError")
    pod(cluster, "plain", script)
    fallback = terminated(wait_pod(cluster, "fallback", lambda p: p["status"].get("phase") == "Failed"))
    plain = terminated(wait_pod(cluster, "plain", lambda p: p["status"].get("phase") == "Failed"))
    assert (fallback["exitCode"], fallback["reason"]) == (3, "Error")
    lines = fallback["message"].splitlines()
    assert lines[-1] == "line 199" and len(lines) <= 80 and len(fallback["message"].encode()) <= 2048
    assert plain["exitCode"] == 3 and "message" not in plain


def test_a_root_container_of_a_non_root_pod_is_not_started(cluster):
    pod(cluster, "root", "print('never')", securityContext={"runAsUser": 0})
    waiting = wait_pod(cluster, "root", lambda p: any(
        (s.get("state") or {}).get("waiting") for s in (p["status"].get("containerStatuses") or [])))
    state = waiting["status"]["containerStatuses"][0]["state"]["waiting"]
    assert state["reason"] == "CreateContainerConfigError" and "runAsNonRoot" in state["message"]
    assert waiting["status"]["phase"] == "Pending"


def test_secret_values_reach_the_container_through_the_node_authorizer(cluster):
    cluster.apply_secret(cluster.namespace, "keys", {"token": "s3cr3t"})
    pod(cluster, "secret", "import os; open(os.environ['TERMINATION_LOG'], 'w').write(os.environ['TOKEN'][::-1])",
        env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "token"}}}])
    done = wait_pod(cluster, "secret", lambda p: p["status"].get("phase") == "Succeeded")
    assert terminated(done)["message"] == "t3rc3s"


IN_CLUSTER_CLIENT = """
import json, os, pathlib, ssl, urllib.request
account = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")
token, namespace = (account / "token").read_text(), (account / "namespace").read_text()
context = ssl.create_default_context(cafile=str(account / "ca.crt"))
review = urllib.request.Request(
    "https://kubernetes.default.svc/apis/authentication.k8s.io/v1/selfsubjectreviews", method="POST",
    data=json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode(),
    headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
user = json.load(urllib.request.urlopen(review, context=context, timeout=10))["status"]["userInfo"]
open(os.environ["TERMINATION_LOG"], "w").write(json.dumps(
    {"namespace": namespace, "user": user["username"], "pod": user["extra"]["authentication.kubernetes.io/pod-name"],
     "service": os.environ["KUBERNETES_SERVICE_HOST"] + ":" + os.environ["KUBERNETES_SERVICE_PORT"]}))
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="a pod's own mount namespace (and port 443) needs root and unshare(1)")
def test_a_pod_that_mounts_its_token_reaches_the_api_server_in_cluster_as_its_service_account(cluster):
    """What the API server's ServiceAccount admission adds (a projected token, the cluster's CA,
    the namespace at the fixed path client libraries read) is filled in as the kubelet does, and
    the `kubernetes` Service answers by name at port 443, as cluster DNS and kube-proxy make it."""
    body = pod_body(cluster, "in-cluster", IN_CLUSTER_CLIENT)
    body["spec"]["automountServiceAccountToken"] = True
    deadline = time.monotonic() + 30
    while True:  # the namespace's `default` ServiceAccount is made by the controller-manager, shortly
        try:
            cluster.core.create_namespaced_pod(cluster.namespace, body)
            break
        except kubernetes.client.ApiException as exc:
            if exc.status != 403 or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    done = wait_pod(cluster, "in-cluster", lambda p: p["status"].get("phase") in ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded", terminated(done)
    seen = json.loads(terminated(done)["message"])
    assert seen == {"namespace": cluster.namespace, "user": f"system:serviceaccount:{cluster.namespace}:default",
                    "pod": ["in-cluster"], "service": f"127.0.0.1:{cluster.plane.port}"}
    assert not Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()  # the host never sees it


def test_deleting_a_running_pod_stops_it_within_its_grace_period_and_removes_it(cluster):
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *_: (print('got SIGTERM', flush=True), sys.exit(143)))\n"
              "print('started', flush=True)\ntime.sleep(120)")
    pod(cluster, "long", script)
    wait_pod(cluster, "long", lambda p: p["status"].get("phase") == "Running")
    began = time.monotonic()
    cluster.core.delete_namespaced_pod("long", cluster.namespace)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if "long" not in {p["metadata"]["name"] for p in cluster.pods(cluster.namespace)}:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the deleted pod was never removed")
    assert time.monotonic() - began < 10  # SIGTERM answered at once, well within the grace period


def test_a_pod_asking_for_more_gpus_than_any_node_has_stays_pending_with_the_schedulers_reason(cluster):
    pod(cluster, "greedy", "print('never')", resources={"limits": {"nvidia.com/gpu": "2"}})
    pending = wait_pod(cluster, "greedy", lambda p: any(
        c["type"] == "PodScheduled" and c["status"] == "False" for c in p["status"].get("conditions") or []))
    condition = next(c for c in pending["status"]["conditions"] if c["type"] == "PodScheduled")
    assert condition["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in condition["message"]
    assert "untolerated taint" in condition["message"]  # the GPU node's taint, which this pod does not tolerate
    assert not pending["spec"].get("nodeName")


def test_a_container_over_its_memory_limit_is_oom_killed_by_the_kernel(cluster):
    pod(cluster, "hungry", "x = bytearray(512 * 2**20); print(len(x))",
        resources={"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "64Mi"}})
    pod(cluster, "modest", "x = bytearray(16 * 2**20); print(len(x))",
        resources={"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "128Mi"}})
    hungry = terminated(wait_pod(cluster, "hungry", lambda p: p["status"].get("phase") == "Failed"))
    assert (hungry["exitCode"], hungry["reason"]) == (137, "OOMKilled")
    modest = wait_pod(cluster, "modest", lambda p: p["status"].get("phase") in ("Succeeded", "Failed"))
    assert modest["status"]["phase"] == "Succeeded"  # the same limit machinery lets a pod under it run


def test_images_resolve_by_tag_or_by_digest_and_report_the_repository_digest(cluster, node_agent):
    """As containerd reports it: imageID `repository@sha256:<digest>`; a digest names the same
    content after its tag was re-pointed; a digest the node does not hold leaves the pod waiting
    with ErrImagePull."""
    first = pod(cluster, "by-tag", "print('a')", image=RUNNER_IMAGE)
    ran = wait_pod(cluster, "by-tag", lambda p: terminated(p))
    image_id = ran["status"]["containerStatuses"][0]["imageID"]
    original = node_agent.images[RUNNER_IMAGE]
    assert image_id == f"{repository(RUNNER_IMAGE)}@{original.digest}" and image_id.startswith("registry.example/")
    assert first["spec"]["containers"][0]["image"] == RUNNER_IMAGE
    other = node_agent.images[STANDIN_IMAGE]
    assert other.digest != original.digest
    try:
        node_agent.tag(RUNNER_IMAGE, other)  # the tag now names other content, as after a push
        pod(cluster, "moved-tag", "print('b')", image=RUNNER_IMAGE)
        pod(cluster, "by-digest", "print('c')", image=image_id)
        moved = wait_pod(cluster, "moved-tag", lambda p: terminated(p))
        pinned = wait_pod(cluster, "by-digest", lambda p: terminated(p))
        assert moved["status"]["containerStatuses"][0]["imageID"] == f"{repository(RUNNER_IMAGE)}@{other.digest}"
        assert pinned["status"]["containerStatuses"][0]["imageID"] == image_id  # still the first content
        assert terminated(pinned)["exitCode"] == 0
        pod(cluster, "unknown", "print('d')", image=f"{repository(RUNNER_IMAGE)}@sha256:{'0' * 64}")
        waiting = wait_pod(cluster, "unknown", lambda p: ((p["status"].get("containerStatuses") or [{}])[0]
                                                          .get("state") or {}).get("waiting"))
        assert waiting["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ErrImagePull"
        assert waiting["status"]["phase"] == "Pending"
    finally:
        node_agent.tag(RUNNER_IMAGE, original)


def test_repository_strips_a_tag_or_digest_and_keeps_a_registry_port():
    assert repository("registry.example/disp-runner:test") == "registry.example/disp-runner"
    assert repository("localhost:5000/team/disp@sha256:" + "a" * 64) == "localhost:5000/team/disp"
    assert repository("localhost:5000/team/disp") == "localhost:5000/team/disp"
    assert repository("stand-in") == "stand-in"
