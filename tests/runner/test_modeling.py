"""The built-in MDLM is a proper transformers model: Auto classes, safetensors round trip."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

from disp_runner.checkpoints import build_model, load_checkpoint, save_checkpoint
from disp_runner.data.synthetic import generate_instances
from disp_runner.modeling import MDLMConfig, MDLMForMaskedDiffusion
from disp_runner.processing import encode_instances


def _batch(tokenizer, model, n=4):
    return encode_instances(tokenizer, model.config, generate_instances(n, 5, image_size=model.config.image_size),
                            model.config.gen_length)


def test_save_load_round_trip_gives_identical_logits(tmp_path, tokenizer, tiny_model):
    batch = _batch(tokenizer, tiny_model)
    with torch.no_grad():
        before = tiny_model(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                            attention_mask=batch.attention_mask)
    save_checkpoint(tiny_model, tokenizer, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded, loaded_tokenizer = load_checkpoint(tmp_path)
    with torch.no_grad():
        after = loaded(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask)
    assert torch.equal(before, after)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()


def test_auto_classes_know_the_model(tmp_path, tokenizer, tiny_model):
    save_checkpoint(tiny_model, tokenizer, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "disp_mdlm"
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MDLMConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), MDLMForMaskedDiffusion)


def test_size_is_configuration_only(tokenizer):
    small = build_model(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    large = build_model(tokenizer, hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1024)
    assert type(small) is type(large)
    assert large.num_parameters() > 20 * small.num_parameters()
    assert set(small.num_parameters_by_part()) == {"vision_encoder", "projector", "language_model"}


def test_special_token_ids_come_from_the_tokenizer(tokenizer, tiny_model):
    assert tiny_model.config.mask_token_id == tokenizer.mask_token_id
    assert tiny_model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert torch.equal(tiny_model.mask_embedding(), tiny_model.embed_tokens.weight[tokenizer.mask_token_id])


def test_visual_tokens_are_spliced_into_the_placeholders(tokenizer, tiny_model):
    batch = _batch(tokenizer, tiny_model, n=2)
    image_embeds = tiny_model.embed_images(batch.pixel_values)
    assert image_embeds.shape == (2, tiny_model.config.num_image_tokens, tiny_model.config.hidden_size)
    embeds = tiny_model.embed_inputs(batch.input_ids, image_embeds)
    positions = batch.input_ids == tiny_model.config.image_token_id
    assert torch.equal(embeds[positions].view(2, -1, tiny_model.config.hidden_size), image_embeds)


def test_shape_errors_name_the_shapes(tokenizer, tiny_model):
    batch = _batch(tokenizer, tiny_model, n=2)
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\].*\[2, 3, 8, 8\]"):
        tiny_model.embed_images(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="placeholders"):
        tiny_model.embed_inputs(batch.input_ids, torch.zeros(2, 3, tiny_model.config.hidden_size))
    with pytest.raises(ValueError, match="patch_size"):
        MDLMConfig(image_size=50, patch_size=8)


def test_left_padding_does_not_change_a_sequences_logits(tokenizer, tiny_model):
    """Positions count from the first real token, so padding in front of a prompt is invisible."""
    short = generate_instances(1, 1, image_size=16)[0]
    long = short.replace(prompt=short.prompt + " " + "describe this image in detail ." * 2, id="b")
    batch = encode_instances(tokenizer, tiny_model.config, [short, long], 16)
    alone = encode_instances(tokenizer, tiny_model.config, [short], 16)
    with torch.no_grad():
        padded = tiny_model(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                            attention_mask=batch.attention_mask)[0]
        single = tiny_model(input_ids=alone.input_ids, pixel_values=alone.pixel_values,
                            attention_mask=alone.attention_mask)[0]
    n = single.shape[0]
    assert torch.allclose(padded[-n:], single, atol=1e-5)
