"""Installed and operated as a platform team does it, with the real tools (helm, kubectl, kustomize;
tests/harness/tools.py) against a real control plane of this module's own, on which nothing was
installed before (the session's control plane has the CRD applied by the tests):

- the "Deploy on a cluster" block of docs/deploy.md, run as written, line by line;
- what `kubectl get` and `kubectl explain` show a user of the installed CRD;
- `helm upgrade` to a newer chart with a job in the cluster, and `helm uninstall` as the NOTES say;
- the GitOps example built by kustomize and applied with kubectl, then re-run as docs/deploy.md says."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.request

import pytest
import yaml

from disp_operator.crd import IMMUTABLE_MESSAGE
from tests.harness.controlplane import REPO, running_control_plane
from tests.harness.minio import S3_ACCESS, S3_SECRET, MinioServer
from tests.harness.node_agent import OPERATOR_IMAGE, RUNNER_IMAGE, NodeAgent, NodeSpec
from tests.harness.tools import Shell, ToolError, toolbox

DEPLOY_PAGE = REPO / "docs" / "deploy.md"
CHART = REPO / "charts" / "disp-operator"
CRD_NAME = "purificationjobs.disp.dev"


@pytest.fixture(scope="module")
def platform_plane(tmp_path_factory):
    """A fresh control plane, nothing installed on it."""
    with running_control_plane(tmp_path_factory.mktemp("platform") / "plane") as plane:
        yield plane


@pytest.fixture(scope="module")
def platform(platform_plane, tmp_path_factory):
    """A shell whose kubectl and helm act as the fresh control plane's cluster admin, with the S3
    keys the deploy page's reader puts in the jobs' Secret (the keys of the MinIO below)."""
    return Shell(toolbox(), platform_plane.admin_kubeconfig, tmp_path_factory.mktemp("home"),
                 extra_env={"S3_ACCESS_KEY": S3_ACCESS, "S3_SECRET_KEY": S3_SECRET})


# The deploy page's prerequisites, made here: MinIO at minio.minio.svc:9000 (a MinIO server on a
# loopback address of its own, the Service's name resolved to it in every pod as cluster DNS and
# kube-proxy would), holding the model and the data that crds/examples/minimal.yaml names, and a
# GPU node that runs the images the page's `helm install` names (the node agent runs them over
# this checkout: tests/harness/node_agent.py).
SERVICE_ADDRESS = "127.0.0.2"


@pytest.fixture
def prerequisites(platform_plane, minio_binary, workspace, tmp_path):
    from minio import Minio

    with socket.socket() as probe:  # a server left on the Service's address would answer for ours
        if probe.connect_ex((SERVICE_ADDRESS, 9000)) == 0:
            pytest.fail(f"{SERVICE_ADDRESS}:9000 is taken (a MinIO left by an interrupted run?)")
    server = MinioServer(minio_binary, tmp_path / "minio", port=9000, address=SERVICE_ADDRESS).start()
    agent = NodeAgent(platform_plane, tmp_path / "node", (NodeSpec("gpu-node-0", gpus=1),))
    try:
        agent.host_aliases["minio.minio.svc"] = SERVICE_ADDRESS
        agent.tag("registry.example/disp-operator:0.1.0", agent.images[OPERATOR_IMAGE])
        agent.tag("registry.example/disp-runner:0.1.0", agent.images[RUNNER_IMAGE])
        client = Minio(server.endpoint, access_key=S3_ACCESS, secret_key=S3_SECRET, secure=False)
        for bucket in ("models", "datasets", "disp-runs"):
            client.make_bucket(bucket)
        for folder, bucket, prefix in ((workspace / "model", "models", "llada-v-finetuned"),
                                       (workspace / "train", "datasets", "vqa-finetune")):
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                client.fput_object(bucket, f"{prefix}/{path.relative_to(folder).as_posix()}", str(path))
        yield agent
    finally:
        agent.close()
        server.stop()


def readme_steps() -> dict[int, str]:
    """The shell block of "Deploy on a cluster" (docs/deploy.md), split at its numbered comments."""
    section = DEPLOY_PAGE.read_text().split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    steps: dict[int, str] = {}
    for part in re.split(r"^(?=# \d\. )", block, flags=re.M):
        if part.strip():
            steps[int(part[2])] = part
    return steps


# What the test does not run, and why: port-forward needs a kubelet's streaming server, which the
# node agent does not serve (the test reads the same metrics where the pod serves them instead).
# Listed exactly, so that a new line in the page is run, not skipped.
NOT_RUN_HERE = {
    "kubectl -n disp-system port-forward svc/disp-operator-metrics 9090 &",
    "curl -s localhost:9090/metrics | grep ^disp_",
}
WAIT_SECONDS = 900  # the page's `kubectl wait` says 12h (a GPU run); the tiny model's run takes minutes


def runnable(step: str) -> str:
    """The step's commands (continuation lines joined, comments dropped) less NOT_RUN_HERE."""
    commands, current = [], ""
    for line in step.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        current += line
        if line.endswith("\\"):
            current = current[:-1] + " "
            continue
        commands.append(re.sub(r"\s+#.*$", "", current).strip())
        current = ""
    skipped = [c for c in commands if c in NOT_RUN_HERE]
    return "\n".join(c for c in commands if c not in skipped)


def test_the_readme_deploy_block_runs_a_job_to_succeeded_as_written_on_a_real_api_server(platform, prerequisites):
    agent = prerequisites
    steps = readme_steps()
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert NOT_RUN_HERE <= {re.sub(r"\s+#.*$", "", line).strip() for step in steps.values()
                            for line in step.splitlines()}, "a command this test skips is no longer in docs/deploy.md"

    platform.run(runnable(steps[1]))
    notes = platform.run(runnable(steps[2])).stdout
    assert "STATUS: deployed" in notes and "Jobs in ml-team need the S3 keys there" in notes
    try:
        follow = platform.run(runnable(steps[3]), timeout=WAIT_SECONDS)
    except (ToolError, subprocess.TimeoutExpired) as exc:
        raise AssertionError(f"{exc}\n{_what_the_cluster_says(platform, agent)}") from None
    header = follow.stdout.splitlines()[1].split()  # after `kubectl apply`'s line
    shown = re.search(r"^NAME +PHASE .*$", (REPO / "docs" / "operator.md").read_text(), re.M).group(0).split()
    assert header == shown, follow.stdout
    assert follow.stdout.splitlines()[2].split()[0] == "llada-v-purify"
    assert "condition met" in follow.stdout.splitlines()[-1], follow.stdout
    job = json.loads(platform.run("kubectl -n ml-team get pj llada-v-purify -o json").stdout)
    assert job["status"]["phase"] == "Succeeded"
    assert job["status"]["purifiedModelUri"].startswith("s3://disp-runs/")
    # Each stage ran once, in a pod of the runner image the install named, on the GPU node.
    assert [name for namespace, name in agent.started if namespace == "ml-team"] == [
        f"llada-v-purify-{stage}" for stage in ("saliency", "masking", "relabel", "finetune")]
    assert not agent.errors, agent.errors

    # 4: the metrics port-forward would show, read where the operator's pod serves them (a pod of
    # this node shares the host's network).
    metrics = urllib.request.urlopen("http://127.0.0.1:9090/metrics", timeout=10).read().decode()
    assert 'disp_job_phase{name="llada-v-purify",namespace="ml-team",phase="Succeeded"} 1.0' in metrics, \
        [line for line in metrics.splitlines() if line.startswith("disp_")]

    # What the install made: every object of `helm get manifest` is in the cluster, and the
    # Deployment's pod was made by the real controllers and runs the README's images and settings.
    manifest = [d for d in yaml.safe_load_all(platform.run("helm get manifest disp-operator -n disp-system").stdout)
                if d]
    for doc in manifest:
        namespace = doc["metadata"].get("namespace")
        where = f"-n {namespace} " if namespace else ""
        platform.run(f"kubectl get {where}{_resource(doc)} {doc['metadata']['name']} -o name")
    pods = json.loads(platform.run("kubectl -n disp-system get pods -l app.kubernetes.io/name=disp-operator "
                                   "-o json").stdout)["items"]
    assert len(pods) == 1 and pods[0]["spec"]["containers"][0]["image"] == "registry.example/disp-operator:0.1.0"
    env = {e["name"]: e.get("value") for e in pods[0]["spec"]["containers"][0]["env"]}
    assert env["DISP_RUNNER_IMAGE"] == "registry.example/disp-runner:0.1.0"
    assert env["DISP_CREDENTIAL_NAMESPACES"] == "ml-team" and env["DISP_S3_ENDPOINT"] == "minio.minio.svc:9000"

    # 5: uninstall keeps the CRD and the job, as the step's comment and the chart's NOTES say.
    uid = platform.run("kubectl -n ml-team get pj llada-v-purify -o jsonpath={.metadata.uid}").stdout
    platform.run(runnable(steps[5]))
    assert "It watches every namespace" in notes and "the CRD and so every PurificationJob stay" in notes
    assert platform.run("helm list -n disp-system -q").stdout.strip() == ""
    platform.run(f"kubectl get crd {CRD_NAME}")
    assert platform.run("kubectl -n ml-team get pj llada-v-purify -o jsonpath={.metadata.uid}").stdout == uid

    # The chart README's quick start, on the same cluster: the namespace exists by now (so its
    # `kubectl create namespace` is the one line left out), and the new release adopts the kept CRD.
    quick_start = re.search(r"```sh\n(.*?)```", (CHART / "README.md").read_text(), re.S).group(1)
    assert quick_start.splitlines()[0].startswith("kubectl create namespace ml-team")
    platform.run(runnable("\n".join(quick_start.splitlines()[1:])))
    platform.run(f"kubectl wait --for=condition=Established crd/{CRD_NAME} --timeout=60s")
    crd = json.loads(platform.run(f"kubectl get crd {CRD_NAME} -o json").stdout)
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == "disp-operator"
    platform.run("helm uninstall disp-operator -n disp-system")


def _what_the_cluster_says(platform: Shell, agent: NodeAgent) -> str:
    """What a platform team would look at when the run did not succeed: the job, the pods, the logs."""
    parts = [platform.run(command, check=False).stdout for command in (
        "kubectl -n ml-team get pj llada-v-purify -o yaml", "kubectl get pods -A -o wide",
        "kubectl -n ml-team get events --sort-by=.lastTimestamp | tail -30")]
    for log in sorted((agent.workdir / "logs").glob("*.log")) if (agent.workdir / "logs").is_dir() else []:
        parts.append(f"--- {log.name}\n" + log.read_text(errors="replace")[-3000:])
    return "\n".join(parts + [f"node agent errors: {agent.errors}"])


def _resource(doc: dict) -> str:
    """`kind.group` for `kubectl get` (the kind alone in the core group)."""
    kind, api_version = doc["kind"].lower(), doc["apiVersion"]
    return f"{kind}.{api_version.split('/')[0]}" if "/" in api_version else kind


def installed(platform: Shell) -> None:
    """The chart installed (or upgraded in place) with the least values, and the jobs' namespace."""
    platform.run("kubectl get namespace ml-team || kubectl create namespace ml-team")
    platform.run(f"helm upgrade --install disp-operator {CHART} -n disp-system --create-namespace "
                 "--set 'credentialNamespaces={ml-team}'")
    platform.run(f"kubectl wait --for=condition=Established crd/{CRD_NAME} --timeout=60s")


def _schema_fields(node: dict, prefix: str = "") -> dict[str, dict]:
    fields = {}
    for name, sub in (node.get("properties") or {}).items():
        fields[prefix + name] = sub
        fields.update(_schema_fields(sub, f"{prefix}{name}."))
        if isinstance(sub.get("items"), dict):
            fields.update(_schema_fields(sub["items"], f"{prefix}{name}."))
    return fields


def _explained_fields(text: str) -> set[str]:
    """The dotted paths `kubectl explain --recursive` lists (two spaces of indent per level)."""
    paths, stack = set(), []
    for line in text.split("FIELDS:\n", 1)[1].splitlines():
        match = re.match(r"^( +)(\w+)\t<", line)
        if not match:
            continue  # an enum's values, a blank line
        depth = len(match.group(1)) // 2 - 1
        stack = stack[:depth] + [match.group(2)]
        paths.add(".".join(stack))
    return paths


def test_kubectl_explain_describes_every_field_of_the_installed_crd(platform):
    installed(platform)
    crd = json.loads(platform.run(f"kubectl get crd {CRD_NAME} -o json").stdout)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in ("spec", "status"):
        fields = _schema_fields(schema["properties"][part])
        explained = _explained_fields(platform.run(f"kubectl explain purificationjob.{part} --recursive").stdout)
        assert explained == set(fields), (part, set(fields) ^ explained)
        undescribed = [path for path, sub in fields.items() if not sub.get("description")]
        assert undescribed == [], f"{part}: fields kubectl explain shows without a description: {undescribed}"
        # one paragraph each: kubectl wraps the text itself, so a line break would be mid-sentence
        assert [path for path, sub in fields.items() if re.search(r"\S\n\S", sub["description"])] == []
    shown = platform.run("kubectl explain purificationjob.spec.relabel.decoding.genLength").stdout
    description = " ".join(shown.split("DESCRIPTION:", 1)[1].split())
    assert description == " ".join(_schema_fields(schema)["spec.relabel.decoding.genLength"]["description"].split())


def test_helm_upgrade_to_a_newer_chart_keeps_the_jobs_and_updates_the_crd(platform, tmp_path):
    """This chart has had one release, 0.1.0: the newer chart is the same chart at 0.1.1 whose CRD
    has one more printer column, which is what an upgrade changes in a CRD that keeps its version."""
    installed(platform)
    platform.run("kubectl apply -f crds/examples/minimal.yaml")
    uid = platform.run("kubectl -n ml-team get pj llada-v-purify -o jsonpath={.metadata.uid}").stdout
    newer = tmp_path / "disp-operator"
    shutil.copytree(CHART, newer)
    chart = yaml.safe_load((newer / "Chart.yaml").read_text())
    (newer / "Chart.yaml").write_text(yaml.safe_dump({**chart, "version": "0.1.1"}, sort_keys=False))
    crd_file = newer / "files" / "purificationjobs.disp.dev.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    crd["spec"]["versions"][0]["additionalPrinterColumns"].insert(
        -1, {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri"})
    crd_file.write_text(yaml.safe_dump(crd, sort_keys=False))

    platform.run(f"helm upgrade disp-operator {newer} -n disp-system --reuse-values")
    history = platform.run("helm history disp-operator -n disp-system -o json").stdout
    assert [r["chart"] for r in json.loads(history)][-1] == "disp-operator-0.1.1"
    columns = platform.run("kubectl -n ml-team get pj llada-v-purify").stdout.splitlines()
    assert "MODEL" in columns[0].split() and "s3://models/llada-v-finetuned" in columns[1]
    assert platform.run("kubectl -n ml-team get pj llada-v-purify -o jsonpath={.metadata.uid}").stdout == uid
    platform.run("helm uninstall disp-operator -n disp-system")
    assert platform.run("kubectl -n ml-team get pj llada-v-purify -o jsonpath={.metadata.uid}").stdout == uid


def test_the_gitops_example_built_by_kustomize_is_a_run_and_a_bumped_suffix_a_new_one(platform, tmp_path):
    """docs/deploy.md "Re-running from Git": kustomize builds the example; applied, it is the run `-r1`; the
    same job with a changed parameter is refused by the API server with the way out; the change with
    the next suffix is a new run beside the first."""
    installed(platform)
    first = platform.run("kustomize build crds/examples/gitops | kubectl apply -f -").stdout
    assert first.strip() == "purificationjob.disp.dev/llada-v-purify-r1 created"
    changed = tmp_path / "gitops"
    shutil.copytree(REPO / "crds" / "examples" / "gitops", changed)
    job = yaml.safe_load((changed / "purificationjob.yaml").read_text())
    job["spec"]["finetune"]["epochs"] = 8
    (changed / "purificationjob.yaml").write_text(yaml.safe_dump(job))
    refused = platform.run(f"kustomize build {changed} | kubectl apply -f -", check=False)
    assert refused.returncode != 0 and IMMUTABLE_MESSAGE.split(";")[0] in refused.stderr, refused.stderr
    assert "nameSuffix" in refused.stderr  # the way out, in the message
    kustomization = (changed / "kustomization.yaml").read_text().replace("nameSuffix: -r1", "nameSuffix: -r2")
    (changed / "kustomization.yaml").write_text(kustomization)
    second = platform.run(f"kustomize build {changed} | kubectl apply -f -").stdout
    assert second.strip() == "purificationjob.disp.dev/llada-v-purify-r2 created"
    runs = json.loads(platform.run("kubectl -n ml-team get pj -o json").stdout)["items"]
    by_name = {r["metadata"]["name"]: r for r in runs}
    assert by_name["llada-v-purify-r1"]["spec"]["finetune"]["epochs"] == 4
    assert by_name["llada-v-purify-r2"]["spec"]["finetune"]["epochs"] == 8
    assert by_name["llada-v-purify-r1"]["metadata"]["uid"] != by_name["llada-v-purify-r2"]["metadata"]["uid"]
    platform.run("helm uninstall disp-operator -n disp-system")
