"""Untrusted model folders: safetensors only unless the user opts in; tokenizers must have [MASK]."""

import json

import pytest
import torch

from disp_runner.models.loading import load_model, save_model
from disp_runner.errors import UnsafeModelFormatError, UserInputError
from disp_runner.models.mdlm import MDLMForMaskedDiffusion


@pytest.fixture
def saved(tmp_path, tiny_model, tiny_processor):
    return save_model(tiny_model, tiny_processor, tmp_path / "model")


def _to_pickle_only(folder, model):
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")


def test_folder_without_weights_is_rejected(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(UserInputError, match=r"model$|no model weights \(\*.safetensors\) found"):
        load_model(saved)


def test_pickle_only_weights_are_refused_without_opt_in(saved, tiny_model):
    _to_pickle_only(saved, tiny_model)
    with pytest.raises(UnsafeModelFormatError, match="pytorch_model.bin.*--allow-unsafe-pickle"):
        load_model(saved)


def test_pickle_weights_load_with_explicit_opt_in(saved, tiny_model):
    _to_pickle_only(saved, tiny_model)
    model, _ = load_model(saved, allow_unsafe_pickle=True)
    assert isinstance(model, MDLMForMaskedDiffusion)
    assert torch.equal(model.projector.linear_1.weight, tiny_model.projector.linear_1.weight)


def test_tokenizer_without_mask_token_is_rejected(saved):
    path = saved / "tokenizer.json"
    data = json.loads(path.read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "[MASK]"]
    data["model"]["vocab"].pop("[MASK]")
    path.write_text(json.dumps(data))
    config = json.loads((saved / "tokenizer_config.json").read_text())
    config.pop("mask_token", None)
    config.get("added_tokens_decoder", {}).pop("2", None)
    (saved / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match=r"tokenizer.json: tokenizer lacks the special token\(s\) \[MASK\]"):
        load_model(saved)


def test_foreign_model_types_are_refused_not_executed(saved):
    config = json.loads((saved / "config.json").read_text())
    config.update(model_type="evil_remote", auto_map={"AutoModel": "evil.Model"})
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match=r"model_type is 'evil_remote'; this runner loads 'disp_mdlm', 'llava_llada' models"):
        load_model(saved)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="config.json: model config not found"):
        load_model(tmp_path / "empty")
