"""The container rules the node agent and the podman runs share (container_rules.py): the
image configuration read from a Dockerfile, Kubernetes' command/args and $(VAR) rules, the user,
and the operator's stage pods resolved against the real runner image's configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from disp_api import StageName
from disp_api.status import StepKind
from disp_operator.jobs import RunnerDefaults, stage_job
from disp_runner.cli import build_parser
from tests.operator.conftest import make_job
from tests.harness.container_rules import (PYTHON_BASE, ContainerConfigError, ImageConfig, container_env,
                                            container_process, expand, image_config,
                                            process_argv, process_identity)

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"
IMAGE = ImageConfig(entrypoint=("/bin/entry", "--flag"), cmd=("default", "cmd"))
NO_SECRETS = lambda name, key: None  # noqa: E731


# --- the image configuration, from the Dockerfile --------------------------------------------------

def test_the_runner_and_operator_targets_run_disp_as_the_non_root_user():
    runner = image_config(DOCKERFILE, "runner")
    assert (runner.entrypoint, runner.cmd, runner.user, runner.workdir) == (("disp",), ("--help",), "10001:10001", "/")
    assert runner.env["PATH"].startswith("/opt/disp/bin:") and runner.env["HOME"] == "/scratch/home"
    assert runner.env["HF_HUB_OFFLINE"] == "1"
    operator = image_config(DOCKERFILE, "operator")
    assert (operator.entrypoint, operator.cmd) == (("disp-operator",), ("--all-namespaces",))
    assert "HF_HOME" not in operator.env  # each final stage starts from the base, not from the other


def test_the_builder_rules_for_entrypoint_cmd_env_and_workdir(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=python:3.11-slim\n"
        "FROM ${BASE} AS base\n"
        "ENV A=1 \\\n    B=\"two words\"\n"
        "ENV PATH=/opt/x/bin:$PATH\n"
        "WORKDIR /app\n"
        "WORKDIR sub\n"
        "FROM base AS keeps-cmd\n"
        "USER 7:8\n"
        "FROM base AS entrypoint-resets-inherited-cmd\n"
        "ENTRYPOINT [\"tool\"]\n"
        "FROM base AS shell-forms\n"
        "CMD echo $A\n"
        "ENTRYPOINT run it\n")
    keeps = image_config(dockerfile, "keeps-cmd")
    assert (keeps.cmd, keeps.user, keeps.workdir) == (PYTHON_BASE.cmd, "7:8", "/app/sub")
    assert keeps.env["B"] == "two words" and keeps.env["PATH"] == "/opt/x/bin:" + PYTHON_BASE.env["PATH"]
    reset = image_config(dockerfile, "entrypoint-resets-inherited-cmd")
    assert (reset.entrypoint, reset.cmd) == (("tool",), ())
    # A CMD the stage sets itself survives a later ENTRYPOINT; shell form goes through /bin/sh -c.
    shell = image_config(dockerfile, "shell-forms")
    assert shell.entrypoint == ("/bin/sh", "-c", "run it") and shell.cmd == ("/bin/sh", "-c", "echo $A")
    with pytest.raises(KeyError, match="no build target 'nope'"):
        image_config(dockerfile, "nope")


# --- Kubernetes' command and args ------------------------------------------------------------------

@pytest.mark.parametrize("container, argv", [
    ({}, ("/bin/entry", "--flag", "default", "cmd")),                               # neither: ENTRYPOINT + CMD
    ({"args": ["a", "b"]}, ("/bin/entry", "--flag", "a", "b")),                     # args replace CMD only
    ({"command": ["/bin/other"]}, ("/bin/other",)),                                  # command drops CMD too
    ({"command": ["/bin/other"], "args": ["a"]}, ("/bin/other", "a")),              # both: the image is unused
    ({"command": [], "args": []}, ("/bin/entry", "--flag", "default", "cmd")),      # empty lists count as unset
], ids=["neither", "only-args", "only-command", "both", "empty-lists"])
def test_command_and_args_override_the_image_as_kubernetes_does(container, argv):
    assert process_argv(IMAGE, container, {}) == argv


def test_dollar_paren_references_expand_from_the_pod_env_only():
    env = {"INDEX": "3", "EMPTY": ""}
    assert expand("$(INDEX)/8", env) == "3/8"
    assert expand("$(MISSING)-$(EMPTY)-", env) == "$(MISSING)--"  # unknown stays as written
    assert expand("$$(INDEX) $$ $HOME ${INDEX}", env) == "$(INDEX) $ $HOME ${INDEX}"  # $$ escapes; shell forms stay
    image = ImageConfig(entrypoint=("run", "$(FROM_IMAGE)"), env={"FROM_IMAGE": "x"})
    # What the image contributes is not expanded, and the image's ENV is not an expansion source.
    assert process_argv(image, {"args": ["$(FROM_IMAGE)"]}, {}) == ("run", "$(FROM_IMAGE)", "$(FROM_IMAGE)")


def test_env_values_reference_earlier_variables_and_secrets_resolve():
    container = {"env": [
        {"name": "LATER_REF", "value": "$(BASE)/x"},  # BASE is not defined yet: kept
        {"name": "BASE", "value": "/scratch"},
        {"name": "CACHE", "value": "$(BASE)/cache"},
        {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "accessKey"}}},
        {"name": "OPTIONAL", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "nope", "optional": True}}},
    ]}
    env = container_env({}, container, lambda name, key: "AK" if (name, key) == ("s3", "accessKey") else None)
    assert env == {"LATER_REF": "$(BASE)/x", "BASE": "/scratch", "CACHE": "/scratch/cache", "KEY": "AK"}
    with pytest.raises(ContainerConfigError, match='secret "s3" has no key "accessKey"'):
        container_env({}, container, NO_SECRETS)


def test_the_process_env_is_the_image_env_overridden_by_the_pod():
    image = ImageConfig(entrypoint=("x",), env={"PATH": "/bin", "HOME": "/root"})
    process = container_process(image, {}, {"env": [{"name": "HOME", "value": "/scratch/home"}]}, NO_SECRETS)
    assert process.env == {"PATH": "/bin", "HOME": "/scratch/home"} and process.pod_env == {"HOME": "/scratch/home"}
    assert process.workdir == "/" and container_process(image, {}, {"workingDir": "/w"}, NO_SECRETS).workdir == "/w"


def test_the_user_comes_from_the_container_then_the_pod_then_the_image():
    pod = {"spec": {"securityContext": {"runAsUser": 1000, "runAsGroup": 2000, "fsGroup": 3000,
                                        "supplementalGroups": [4000]}}}
    assert process_identity(ImageConfig(user="5:5"), pod, {"securityContext": {"runAsUser": 1}}).user == "1:2000"
    identity = process_identity(ImageConfig(user="5:5"), pod, {})
    assert (identity.uid, identity.gid, identity.groups) == (1000, 2000, (4000, 3000))
    assert process_identity(ImageConfig(user="5:6"), {}, {}).user == "5:6"


@pytest.mark.parametrize("image_user, message", [
    ("", "will run as root"), ("0", "will run as root"), ("disp", "non-numeric user"),
])
def test_run_as_non_root_refuses_a_root_or_unverifiable_user(image_user, message):
    with pytest.raises(ContainerConfigError, match=message):
        process_identity(ImageConfig(user=image_user), {"spec": {"securityContext": {"runAsNonRoot": True}}}, {})


def with_completion_index(template: dict, index: int) -> dict:
    """A pod of an Indexed Job as the Job controller makes it: the index in a label and an
    annotation, and JOB_COMPLETION_INDEX read from it by the downward API (the real controller's
    pods run in tests/e2e/test_containers.py)."""
    key = "batch.kubernetes.io/job-completion-index"
    metadata = {**template.get("metadata", {}), "annotations": {key: str(index)}, "labels": {
        **template.get("metadata", {}).get("labels", {}), key: str(index)}}
    containers = [{**c, "env": [*(c.get("env") or []), {"name": "JOB_COMPLETION_INDEX", "valueFrom": {
        "fieldRef": {"fieldPath": f"metadata.labels['{key}']"}}}]} for c in template["spec"]["containers"]]
    return {"metadata": metadata, "spec": {**template["spec"], "containers": containers}}


def test_an_indexed_pod_gets_its_index_through_the_downward_api():
    template = {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "args": ["$(JOB_COMPLETION_INDEX)/4"]}]}}
    pod = with_completion_index(template, 2)
    process = container_process(ImageConfig(entrypoint=("run",)), pod, pod["spec"]["containers"][0], NO_SECRETS)
    assert process.argv == ("run", "2/4") and process.pod_env["JOB_COMPLETION_INDEX"] == "2"


# --- the operator's stage pods, against the runner image --------------------------------------------

@pytest.mark.parametrize("stage, step, shard_args", [
    (StageName.SALIENCY, StepKind.SHARDS, ["--shard", "1/2"]),
    (StageName.SALIENCY, StepKind.MERGE, ["--merge"]),
    (StageName.FINETUNE, StepKind.RUN, []),
])
def test_every_stage_pod_runs_a_command_line_the_runner_accepts(stage, step, shard_args):
    """The release blocker: the pods once set args ["disp", ...] and no command, so the image's
    ENTRYPOINT ["disp"] made them run `disp disp ...`, which exits 2 on every cluster."""
    job = make_job(parallelism={"saliencyShards": 2})
    pod = stage_job(job, stage, step, 1, RunnerDefaults(image="registry.example/disp-runner:1"))["spec"]["template"]
    if step is StepKind.SHARDS:
        pod = with_completion_index(pod, 1)
    (container,) = pod["spec"]["containers"]
    secrets = lambda name, key: "x"  # noqa: E731
    process = container_process(image_config(DOCKERFILE, "runner"), pod, container, secrets)
    assert process.argv[:4] == ("disp", "--no-progress", "run", "--manifest-env")
    assert list(process.argv[len(process.argv) - len(shard_args):]) == shard_args
    args = build_parser().parse_args(list(process.argv[1:]))  # what `disp` itself makes of it
    assert (args.command, args.stage) == ("run", stage.value)
    assert process.identity.uid == 10001 and process.env["HOME"] == "/scratch/home"
