"""The built-in MDLM is a proper transformers model: Auto classes, safetensors round trip."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel

from disp_runner.data.synthetic import generate_instances
from disp_runner.models.base import ModelPart
from disp_runner.models.loading import load_model, save_model
from disp_runner.models.mdlm import MDLMConfig, MDLMForMaskedDiffusion, build_model


def _batch(processor, n=4):
    return processor.encode(generate_instances(n, 5, image_size=processor.image_size), processor.config.gen_length)


def test_save_load_round_trip_gives_identical_logits(tmp_path, tokenizer, tiny_model, tiny_processor):
    batch = _batch(tiny_processor)
    with torch.no_grad():
        before = tiny_model(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                            attention_mask=batch.attention_mask)
    save_model(tiny_model, tiny_processor, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded, loaded_processor = load_model(tmp_path)
    with torch.no_grad():
        after = loaded(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask)
    assert torch.equal(before, after)
    assert loaded_processor.tokenizer.get_vocab() == tokenizer.get_vocab()


def test_auto_classes_know_the_model(tmp_path, tiny_model, tiny_processor):
    save_model(tiny_model, tiny_processor, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "disp_mdlm"
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MDLMConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), MDLMForMaskedDiffusion)


def test_size_is_configuration_only(tokenizer):
    small, _ = build_model(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    large, _ = build_model(tokenizer, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
                           intermediate_size=1024)
    assert type(small) is type(large)
    assert large.num_parameters() > 20 * small.num_parameters()
    parts = small.parameter_parts()
    assert set(parts) == set(ModelPart)
    # Every parameter is in exactly one part.
    ids = [id(p) for part in parts.values() for p in part]
    assert len(ids) == len(set(ids)) == len(list(small.parameters()))
    assert {id(p) for p in parts[ModelPart.PROJECTOR]} == {id(p) for p in small.projector.parameters()}


def test_special_token_ids_come_from_the_tokenizer(tokenizer, tiny_model):
    assert tiny_model.config.mask_token_id == tokenizer.mask_token_id
    assert tiny_model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert torch.equal(tiny_model.mask_embedding(), tiny_model.embed_tokens.weight[tokenizer.mask_token_id])


def test_visual_tokens_are_spliced_into_the_placeholders(tiny_model, tiny_processor):
    batch = _batch(tiny_processor, n=2)
    image_embeds = tiny_model.embed_images(batch.pixel_values)
    assert image_embeds.shape == (2, tiny_model.config.num_image_tokens, tiny_model.config.hidden_size)
    embeds = tiny_model.embed_inputs(batch.input_ids, image_embeds)
    positions = batch.input_ids == tiny_model.config.image_token_id
    assert torch.equal(embeds[positions].view(2, -1, tiny_model.config.hidden_size), image_embeds)


def test_shape_errors_name_the_shapes(tiny_model, tiny_processor):
    batch = _batch(tiny_processor, n=2)
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\].*\[2, 3, 8, 8\]"):
        tiny_model.embed_images(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="placeholders"):
        tiny_model.embed_inputs(batch.input_ids, torch.zeros(2, 3, tiny_model.config.hidden_size))
    with pytest.raises(ValueError, match="patch_size"):
        MDLMConfig(image_size=50, patch_size=8)


def test_left_padding_does_not_change_a_sequences_logits(tiny_model, tiny_processor):
    """Positions count from the first real token, so padding in front of a prompt is invisible."""
    short = generate_instances(1, 1, image_size=16)[0]
    long = short.replace(prompt=short.prompt + " " + "describe this image in detail ." * 2, id="b")
    batch = tiny_processor.encode([short, long], 16)
    alone = tiny_processor.encode([short], 16)
    with torch.no_grad():
        padded = tiny_model(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                            attention_mask=batch.attention_mask)[0]
        single = tiny_model(input_ids=alone.input_ids, pixel_values=alone.pixel_values,
                            attention_mask=alone.attention_mask)[0]
    n = single.shape[0]
    assert torch.allclose(padded[-n:], single, atol=1e-5)


def test_visual_spans_say_where_the_visual_tokens_are(tiny_processor):
    """Left padding moves each row's visual tokens; the span records where they start."""
    short = generate_instances(1, 1, image_size=16)[0]
    long = short.replace(prompt=short.prompt + " in detail please", id="b")
    batch = tiny_processor.encode([short, long], 16)
    image_id = tiny_processor.config.image_token_id
    assert tiny_processor.layout_of(short).num_tokens == 4
    for row, (start, length) in zip(batch.input_ids, batch.visual_spans.tolist()):
        assert length == 4
        assert (row[start:start + length] == image_id).all() and (row == image_id).sum() == length
    assert batch.visual_spans[0, 0] > batch.visual_spans[1, 0]  # the shorter prompt is padded further
