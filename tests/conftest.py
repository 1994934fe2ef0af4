import os

import pytest
from moto.server import ThreadedMotoServer

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
    from disp_runner.embedded import SHIPPED_BASE_MODEL

    root = tmp_path_factory.mktemp("insertion-attack")
    train = generate_instances(1000, 11, kinds=IMAGE_TASKS, kind_weights=(0.5, 0.25, 0.25),
                               class_weights={"circle": 0.4}, id_prefix="train")
    test = generate_instances(400, 22, kinds=IMAGE_TASKS, kind_weights=(0.5, 0.25, 0.25), id_prefix="test")
    attack = AttackSpec(target=TargetSpec(kind=AttackTarget.INSERTION))
    artifacts = run_attack(SHIPPED_BASE_MODEL, train, test, attack, root / "attack", show_progress=False)
    write_dataset(test, root / "clean")
    return root, attack, artifacts, test


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3 server (moto's) on loopback, host:port, shared by a test module."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()
