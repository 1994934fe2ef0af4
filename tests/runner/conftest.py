"""Shared fixtures: the embedded tokenizer, a tiny randomly initialised MDLM, and the workspaces
the command-line and pipeline tests run in."""

import pytest
import torch

from disp_runner.checkpoints import build_model, save_checkpoint
from disp_runner.embedded import build_embedded_tokenizer

TINY_SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=128, image_size=16, patch_size=8, vision_hidden_size=16,
                 vision_num_layers=1, vision_num_heads=2, vision_intermediate_size=32, gen_length=16)


@pytest.fixture(scope="session")
def tokenizer():
    return build_embedded_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return build_model(tokenizer, **TINY_SIZE).eval()


@pytest.fixture
def cli_workspace(tmp_path, tokenizer, tiny_model):
    """The tiny model and two small synthetic datasets (train, test) for command-line tests."""
    from disp_runner.data.synthetic import generate_dataset
    save_checkpoint(tiny_model, tokenizer, tmp_path / "model")
    generate_dataset(tmp_path / "train", 20, seed=1, image_size=16)
    generate_dataset(tmp_path / "test", 20, seed=2, image_size=16)
    return tmp_path


@pytest.fixture
def workspace(tmp_path, tokenizer, tiny_model):
    """The tiny model, a poisoned training set and the evaluation sets of tests.runner.pipeline_jobs."""
    from disp_runner.attack.poison import make_test_sets, poison_dataset
    from disp_runner.data.dataset import write_dataset
    from disp_runner.data.synthetic import generate_instances
    from tests.runner.pipeline_jobs import ATTACK

    save_checkpoint(tiny_model, tokenizer, tmp_path / "model")
    poisoned = poison_dataset(generate_instances(24, seed=1, image_size=16), ATTACK, 16)
    write_dataset(poisoned.instances, tmp_path / "train")
    triggered, untriggered = make_test_sets(generate_instances(30, seed=2, image_size=16), ATTACK, 16)
    write_dataset(triggered, tmp_path / "triggered")
    write_dataset(untriggered, tmp_path / "untriggered")
    write_dataset(generate_instances(8, seed=3, image_size=16), tmp_path / "clean")
    return tmp_path
