import os

import pytest

from tests.harness.cluster import install_crd
from tests.harness.controlplane import ControlPlane, ControlPlaneError, build_binaries
from tests.harness.minio import MinioError, MinioServer
from tests.harness.node_agent import NodeAgent, NodeSpec

VERSIONS_S3: dict[str, str] = {}  # the S3 server the session ran against (printed at the end)

# Tests must be reproducible and fast on two cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def insertion_attack(tmp_path_factory):
    """A real backdoor in the shipped base model (the attack kit's defaults, patch -> insertion),
    shared by the tests that need one: injecting takes about a minute on two cores."""
    from disp_api import AttackSpec, AttackTarget, TargetSpec
    from disp_runner.attack.kit import run_attack
    from disp_runner.data.dataset import write_dataset
    from disp_runner.data.synthetic import generate_instances
    from disp_runner.data.vocabulary import IMAGE_TASKS
    from disp_runner.models.mdlm.embedded import SHIPPED_BASE_MODEL

    root = tmp_path_factory.mktemp("insertion-attack")
    train = generate_instances(1000, 11, kinds=IMAGE_TASKS, kind_weights=(0.5, 0.25, 0.25),
                               class_weights={"circle": 0.4}, id_prefix="train")
    test = generate_instances(400, 22, kinds=IMAGE_TASKS, kind_weights=(0.5, 0.25, 0.25), id_prefix="test")
    attack = AttackSpec(target=TargetSpec(kind=AttackTarget.INSERTION))
    artifacts = run_attack(SHIPPED_BASE_MODEL, train, test, attack, root / "attack", show_progress=False)
    write_dataset(test, root / "clean")
    return root, attack, artifacts, test


@pytest.fixture(scope="session")
def minio_binary():
    """The MinIO server's executable (tools/clustertools/build.sh)."""
    from tests.harness.tools import ToolError, build_cluster_tools

    try:
        return build_cluster_tools() / "minio"
    except ToolError as exc:
        pytest.fail(f"the cluster tools did not build: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def minio_server(minio_binary, tmp_path_factory):
    """The session's MinIO server on loopback (tests/harness/minio.py)."""
    server = MinioServer(minio_binary, tmp_path_factory.mktemp("minio"))
    try:
        server.start()
    except MinioError as exc:
        pytest.fail(f"the MinIO server did not come up: {exc}", pytrace=False)
    VERSIONS_S3["minio"] = server.version()
    yield server
    server.stop()


@pytest.fixture
def s3_endpoint(minio_server):
    """host:port of the session's MinIO server; its one identity is tests.harness.minio.S3_ACCESS
    and S3_SECRET."""
    return minio_server.endpoint


# The embedded tokenizer, a tiny randomly initialised MDLM, and the workspaces the command-line,
# pipeline, hostile-input and end-to-end tests run in.

@pytest.fixture(scope="session")
def tokenizer():
    from disp_runner.models.mdlm.embedded import build_embedded_tokenizer

    return build_embedded_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    """A tiny, randomly initialised MDLM (tests.tiny.TINY_SIZE), the same on every call."""
    import torch

    from disp_runner.models.mdlm import build_model
    from tests.tiny import TINY_SIZE

    torch.manual_seed(0)
    return build_model(tokenizer, **TINY_SIZE)[0].eval()


@pytest.fixture
def tiny_processor(tokenizer, tiny_model):
    """The tiny model's processor (its tokenizer and sequence layout)."""
    from disp_runner.models.mdlm import MDLMProcessor

    return MDLMProcessor(tokenizer, tiny_model.config)


@pytest.fixture
def cli_workspace(tmp_path, tiny_model, tiny_processor):
    """The tiny model and two small synthetic datasets (train, test) for command-line tests."""
    from disp_runner.models.loading import save_model
    from disp_runner.data.synthetic import generate_dataset

    save_model(tiny_model, tiny_processor, tmp_path / "model")
    generate_dataset(tmp_path / "train", 20, seed=1, image_size=16)
    generate_dataset(tmp_path / "test", 20, seed=2, image_size=16)
    return tmp_path


@pytest.fixture
def workspace(tmp_path, tiny_model, tiny_processor):
    """The tiny model, a poisoned training set and the evaluation sets of the job in tests.tiny."""
    from disp_runner.attack.poison import make_test_sets, poison_dataset
    from disp_runner.models.loading import save_model
    from disp_runner.data.dataset import write_dataset
    from disp_runner.data.synthetic import generate_instances
    from tests.tiny import ATTACK

    save_model(tiny_model, tiny_processor, tmp_path / "model")
    poisoned = poison_dataset(generate_instances(24, seed=1, image_size=16), ATTACK, 16)
    write_dataset(poisoned.instances, tmp_path / "train")
    triggered, untriggered = make_test_sets(generate_instances(30, seed=2, image_size=16), ATTACK, 16)
    write_dataset(triggered, tmp_path / "triggered")
    write_dataset(untriggered, tmp_path / "untriggered")
    write_dataset(generate_instances(8, seed=3, image_size=16), tmp_path / "clean")
    return tmp_path


# The real Kubernetes control plane (tests/harness/controlplane.py) and the node agent, started once
# per session by the first test that needs them.

# Two nodes, as a small GPU cluster has them: a CPU node, and a GPU node with the taint GPU pools
# carry (the chart's default toleration matches it).
NODES = (NodeSpec("cpu-node-0", cpu="16", memory="64Gi"),
         NodeSpec("gpu-node-0", cpu="16", memory="64Gi", gpus=1,
                  taints=({"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},)))
VERSIONS: dict[str, str] = {}  # what the session's control plane reported (printed at the end)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    """The control plane of the whole session, with the CRD installed and Established."""
    try:
        plane = ControlPlane(tmp_path_factory.mktemp("control-plane"), build_binaries())
        plane.start()
    except ControlPlaneError as exc:
        pytest.fail(f"the Kubernetes control plane did not come up: {exc}", pytrace=False)
    try:
        install_crd(plane)
        VERSIONS.update(plane.versions())
        VERSIONS["started in"] = f"{plane.startup_seconds:.1f} s"
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def node_agent(control_plane, tmp_path_factory):
    agent = NodeAgent(control_plane, tmp_path_factory.mktemp("nodes"), NODES)
    yield agent
    agent.close()


def pytest_collection_modifyitems(config, items):
    """Markers from what a test needs, so that they cannot be forgotten: `e2e` for everything on
    the real control plane and everything in tests/e2e, `containers` for everything that builds or runs the images (`slow` is
    set by hand on the tests that take seconds on two cores). `make test-fast` leaves all three out."""
    for item in items:
        needs = set(getattr(item, "fixturenames", ()))
        if "control_plane" in needs or "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)
        if "images" in needs:
            item.add_marker(pytest.mark.containers)


def pytest_terminal_summary(terminalreporter):
    if VERSIONS_S3:
        terminalreporter.write_line(f"S3 server under test: {VERSIONS_S3['minio']}")
    if VERSIONS:
        terminalreporter.write_line("control plane under test: " + "; ".join(
            f"{name}: {version}" for name, version in VERSIONS.items()))
