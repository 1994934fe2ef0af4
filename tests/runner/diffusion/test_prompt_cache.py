"""Prompt-cache decoding (`decoding.cache`): the cached passes compute what a full pass computes
when nothing changed since the cache was made, for both families and left-padded batches of
different visual lengths; refreshed at every step the cache decodes exactly as exact decoding;
once per block it stays close on a trained model; seeds and shards behave as in exact decoding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from disp_api import DecodingCache, DecodingSpec
from disp_runner.data.synthetic import generate_instances
from disp_runner.diffusion.decoding import DecodingConfig
from disp_runner.diffusion.inference import generate_responses
from disp_runner.diffusion.prompt_cache import require_prompt_caching
from disp_runner.errors import UserInputError
from disp_runner.models.base import PromptCaching
from disp_runner.models.loading import load_model
from tests.runner.models.test_llada_v import tiny_checkpoint

SHIPPED = "runner/disp_runner/models/mdlm/assets/base-mdlm"


def _embedded():
    loaded = load_model(SHIPPED)
    instances = generate_instances(12, seed=5, image_size=loaded.processor.image_size)
    return loaded.model, loaded.processor, instances


def _llada_v():
    instances = generate_instances(6, seed=5, image_size=28) + generate_instances(6, seed=6, image_size=56)
    corpus = [t for inst in instances for t in (inst.prompt, inst.response)]
    model, processor = tiny_checkpoint(None, corpus)
    return model, processor, [instances[i] for i in (0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11)]  # sizes interleaved


FAMILIES = {"embedded": _embedded, "llada-v": _llada_v}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]()


@torch.no_grad()
def test_cached_passes_equal_a_full_pass_when_nothing_changed(family):
    model, processor, instances = family
    assert isinstance(model, PromptCaching)
    gen = 8
    batch = processor.encode(instances, gen, with_response=False)
    assert len(set(batch.visual_spans[:, 0].tolist())) > 1  # left padding differs between rows
    image_embeds = model.embed_images(batch.pixel_values, batch.image_sizes)
    ids = batch.input_ids.clone()
    ids[:, -gen:-gen + 2] = processor.tokenizer.eos_token_id  # the answer partly decided
    full = model(input_ids=ids, image_embeds=image_embeds, attention_mask=batch.attention_mask,
                 visual_spans=batch.visual_spans)
    length = ids.shape[1]
    positions = torch.arange(length)
    block = slice(length - gen + 2, length - 2)
    for keep, window in [(positions < block.start, slice(block.start, length)),  # prefix
                         ((positions < block.start) | (positions >= block.stop), block)]:  # dual
        logits, context = model.forward_with_context(input_ids=ids, attention_mask=batch.attention_mask,
                                                     visual_spans=batch.visual_spans, image_embeds=image_embeds,
                                                     keep=keep, logits_at=block)
        torch.testing.assert_close(logits, full[:, block], atol=1e-4, rtol=1e-4)
        windowed = model.forward_over_context(input_ids=ids, attention_mask=batch.attention_mask, window=window,
                                              keep=keep, context=context)
        torch.testing.assert_close(windowed, full[:, window], atol=1e-4, rtol=1e-4)


def test_a_cache_refreshed_at_every_step_decodes_exactly(family):
    model, processor, instances = family
    for exact in (DecodingConfig(steps=8, gen_length=8, block_length=8),
                  DecodingConfig(steps=8, gen_length=8, block_length=4, temperature=0.7)):
        expected = generate_responses(model, processor, instances, exact, batch_size=4, show_progress=False)
        for cache in (DecodingCache.PREFIX, DecodingCache.DUAL):
            cached = dataclasses.replace(exact, cache=cache, cache_refresh_steps=1)
            assert generate_responses(model, processor, instances, cached, batch_size=4,
                                      show_progress=False) == expected


def test_shards_of_whole_batches_decode_as_the_full_run_with_a_cache(family):
    model, processor, instances = family
    decoding = DecodingConfig(steps=8, gen_length=8, block_length=4, temperature=0.5, cache=DecodingCache.PREFIX)
    whole = generate_responses(model, processor, instances, decoding, batch_size=4, seed=7, show_progress=False)
    parts = (generate_responses(model, processor, instances[:4], decoding, batch_size=4, seed=7, show_progress=False)
             + generate_responses(model, processor, instances[4:], decoding, batch_size=4, seed=7,
                                  show_progress=False, index_offset=4))
    assert parts == whole


def test_the_shipped_model_answers_almost_as_with_exact_decoding():
    """A trained model: the once-per-block prefix cache keeps nearly every answer."""
    loaded = load_model(SHIPPED)
    instances = generate_instances(64, seed=11, image_size=loaded.processor.image_size)
    exact = DecodingConfig.single_block(16)
    expected = generate_responses(loaded.model, loaded.processor, instances, exact, show_progress=False)
    for cache in (DecodingCache.PREFIX, DecodingCache.DUAL):
        answers = generate_responses(loaded.model, loaded.processor, instances,
                                     dataclasses.replace(exact, cache=cache), show_progress=False)
        agreement = sum(a == b for a, b in zip(answers, expected)) / len(instances)
        assert agreement >= 0.9, (cache, agreement)


def test_the_spec_carries_the_cache_and_refuses_a_refresh_without_one():
    config = DecodingConfig.for_model(DecodingSpec.model_validate({"cache": "dual", "cacheRefreshSteps": 4}), 16,
                                      "spec.relabel.decoding")
    assert (config.cache, config.cache_refresh_steps) == (DecodingCache.DUAL, 4)
    with pytest.raises(ValueError, match="cacheRefreshSteps needs cache prefix or dual"):
        DecodingSpec.model_validate({"cacheRefreshSteps": 4})
    with pytest.raises(UserInputError, match="decoding.cache: prefix needs a model family with a prompt cache; object has none"):
        require_prompt_caching(object(), dataclasses.replace(config, cache=DecodingCache.PREFIX))
