"""Shared fixtures: the embedded tokenizer and a tiny, randomly initialised MDLM."""

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
