"""The masked-diffusion loss and decoding follow LLaDA."""

import pytest
import torch
import torch.nn.functional as F

from disp_runner.diffusion.decoding import DecodingConfig, diffusion_generate, transfer_schedule
from disp_runner.diffusion.objective import NoisedBatch, add_mask_noise, masked_diffusion_loss

MASK = 2


def test_noise_masks_only_response_positions():
    ids = torch.randint(5, 50, (64, 20))
    response = torch.zeros(64, 20, dtype=torch.bool)
    response[:, 12:] = True
    noised = add_mask_noise(ids, response, MASK, torch.Generator().manual_seed(0))
    assert not noised.masked[:, :12].any(), "prompt/image positions must never be masked"
    assert torch.equal(noised.noisy_ids[:, :12], ids[:, :12])
    assert (noised.noisy_ids[noised.masked] == MASK).all()
    assert torch.equal(noised.noisy_ids[~noised.masked], ids[~noised.masked])
    # p = (1 - eps) t + eps lies in [eps, 1]; the realised mask rate follows p per sample.
    assert ((noised.mask_prob >= 1e-3) & (noised.mask_prob <= 1)).all()
    rate = noised.masked[:, 12:].float().mean(dim=1)
    assert torch.corrcoef(torch.stack([rate, noised.mask_prob]))[0, 1] > 0.8


def test_loss_is_ce_over_masked_positions_weighted_by_inverse_p_and_divided_by_response_length():
    torch.manual_seed(0)
    b, l, v = 3, 8, 11
    logits = torch.randn(b, l, v)
    targets = torch.randint(0, v, (b, l))
    response = torch.zeros(b, l, dtype=torch.bool)
    response[:, 4:] = True
    masked = torch.zeros(b, l, dtype=torch.bool)
    masked[0, 4] = masked[0, 6] = masked[1, 7] = True  # sample 2 has nothing masked
    p = torch.tensor([0.5, 0.25, 0.9])
    loss = masked_diffusion_loss(logits, targets, NoisedBatch(targets, masked, p), response)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    expected = ((ce[0, 4] + ce[0, 6]) / 0.5 / 4 + ce[1, 7] / 0.25 / 4 + 0.0) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_loss_ignores_unmasked_and_prompt_positions():
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 9, requires_grad=True)
    targets = torch.randint(0, 9, (1, 6))
    response = torch.tensor([[False, False, True, True, True, True]])
    masked = torch.tensor([[False, False, True, False, False, False]])
    loss = masked_diffusion_loss(logits, targets, NoisedBatch(targets, masked, torch.tensor([0.3])), response)
    loss.backward()
    touched = logits.grad.abs().sum(dim=-1)[0]
    assert touched[2] > 0 and touched[[0, 1, 3, 4, 5]].sum() == 0


def test_chat_turn_rows_noise_and_normalise_by_their_own_supervised_tokens(tiny_processor):
    """Chat-turn labels: rows of different lengths, each answer unpadded plus one end token (the
    embedded family has no chat markers); noise falls on those positions only, and each row's loss
    is divided by its own count of them, as LLaDA-V's SFT loss does."""
    from disp_api import FinetuneLabels
    from disp_runner.data.synthetic import generate_instances

    instances = generate_instances(4, 1, image_size=16)
    batch = tiny_processor.encode(instances, 16, labels=FinetuneLabels.CHAT_TURNS)
    eos = tiny_processor.tokenizer.eos_token_id
    counts = batch.response_mask.sum(dim=1).tolist()
    for row, inst in enumerate(instances):
        answer = tiny_processor.answer_ids(inst.response)
        assert counts[row] == len(answer) + 1
        assert batch.input_ids[row, -counts[row]:].tolist() == [*answer, eos]
    assert len(set(counts)) > 1 and max(counts) < 16
    noised = add_mask_noise(batch.input_ids, batch.response_mask, tiny_processor.mask_token_id,
                            torch.Generator().manual_seed(0))
    assert not (noised.masked & ~batch.response_mask).any() and noised.masked.any()
    torch.manual_seed(0)
    logits = torch.randn(*batch.input_ids.shape, 23)
    targets = batch.input_ids % 23
    loss = masked_diffusion_loss(logits, targets, noised, batch.response_mask)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    expected = sum((ce[r] * noised.masked[r]).sum() / noised.mask_prob[r] / counts[r] for r in range(4)) / 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_transfer_schedule_splits_evenly_with_remainder_first():
    schedule = transfer_schedule(torch.tensor([10, 16, 3]), 4)
    assert schedule.tolist() == [[3, 3, 2, 2], [4, 4, 4, 4], [1, 1, 1, 0]]


@pytest.mark.parametrize("steps,gen,block", [(8, 8, 8), (8, 8, 4), (4, 8, 8), (16, 16, 16)])
def test_decoding_unmasks_on_schedule_and_leaves_no_mask(steps, gen, block):
    torch.manual_seed(0)
    prompt = torch.randint(5, 30, (3, 5))
    ids = torch.cat([prompt, torch.full((3, gen), MASK)], dim=1)
    weights = torch.randn(30, 30)

    def logits_fn(x):  # a deterministic stand-in model that never predicts [MASK]
        out = F.one_hot(x, 30).float() @ weights
        out[..., MASK] = -1e9
        return out

    decoding = DecodingConfig(steps=steps, gen_length=gen, block_length=block)
    seen = []
    out = diffusion_generate(logits_fn, ids, MASK, decoding, on_step=lambda i, x: seen.append(x.clone()))
    assert out.shape == (3, gen) and not (out == MASK).any()
    assert len(seen) == steps
    per_block = decoding.steps_per_block
    expected_counts = transfer_schedule(torch.tensor([block]), per_block)[0].tolist() * (gen // block)
    previous = ids
    for step, now in enumerate(seen):
        newly = (previous == MASK) & (now != MASK)
        assert newly.sum(dim=1).tolist() == [expected_counts[step]] * 3
        # semi-autoregressive: only the current block changes
        block_index = step // per_block
        lo = 5 + block_index * block
        cols = newly.nonzero()[:, 1]
        assert ((cols >= lo) & (cols < lo + block)).all()
        assert torch.equal(now[:, :5], prompt), "the prompt is never rewritten"
        previous = now


def test_decoding_keeps_most_confident_tokens_first():
    vocab = 10
    ids = torch.tensor([[7, MASK, MASK, MASK, MASK]])
    confidence = torch.tensor([0.0, 1.0, 5.0, 3.0, 2.0])  # position 2 most confident, then 3, 4, 1

    def logits_fn(x):
        out = torch.zeros(1, 5, vocab)
        out[0, :, 4] = confidence
        return out

    seen = []
    diffusion_generate(logits_fn, ids, MASK, DecodingConfig(steps=4, gen_length=4, block_length=4),
                       on_step=lambda i, x: seen.append((x[0, 1:] != MASK).nonzero().flatten().tolist()))
    assert [s for s in seen] == [[1], [1, 2], [1, 2, 3], [0, 1, 2, 3]]


def test_temperature_zero_is_argmax_and_sampling_is_seeded():
    ids = torch.tensor([[7, MASK, MASK]])
    logits = torch.randn(1, 3, 12)
    logits[..., MASK] = -1e9
    fn = lambda x: logits  # noqa: E731
    greedy = diffusion_generate(fn, ids, MASK, DecodingConfig(steps=2, gen_length=2, block_length=2))
    assert torch.equal(greedy[0], logits[0, 1:].argmax(-1))
    hot = DecodingConfig(steps=2, gen_length=2, block_length=2, temperature=1.0)
    a = diffusion_generate(fn, ids, MASK, hot, torch.Generator().manual_seed(3))
    b = diffusion_generate(fn, ids, MASK, hot, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(gen_length=10, block_length=4), dict(steps=3, gen_length=8, block_length=4),
                                    dict(steps=0), dict(temperature=-1.0)])
def test_invalid_decoding_configs_are_rejected(kwargs):
    with pytest.raises(ValueError):
        DecodingConfig(**kwargs)


def _scripted(confidence_by_position, end_position, end=4, vocab=6):
    """A denoiser whose prediction at position p (of the answer) is word p % 4, or END at
    `end_position`, with confidence order given by `confidence_by_position`; counts its calls."""
    calls = []

    def logits_fn(ids):
        calls.append(1)
        b, l = ids.shape
        logits = torch.full((b, l, vocab), -5.0)
        g = len(confidence_by_position)
        for p in range(g):
            token = end if p == end_position else p % 4
            logits[:, l - g + p, token] = confidence_by_position[p]
        return logits
    return logits_fn, calls


def test_the_authors_stop_rule_fills_only_the_positions_before_a_committed_end_marker():
    from disp_runner.diffusion.decoding import DecodingConfig, diffusion_generate
    mask, end, g = 5, 4, 6
    # END at answer position 2 is the most confident prediction; then positions 5, 4, 3, 0, 1.
    order = [3.0, 2.0, 9.0, 4.0, 5.0, 6.0]
    prompt = torch.tensor([[0, 1] + [mask] * g])
    exact, exact_calls = _scripted(order, end_position=2)
    full = diffusion_generate(exact, prompt, mask, DecodingConfig(steps=g, gen_length=g, block_length=g),
                              end_ids=(end,))
    assert full.tolist() == [[0, 1, end, 3, 0, 1]] and len(exact_calls) == g  # stop_at_end off: every position
    stopping, calls = _scripted(order, end_position=2)
    config = DecodingConfig(steps=g, gen_length=g, block_length=g, stop_at_end=True)
    stopped = diffusion_generate(stopping, prompt, mask, config, end_ids=(end,))
    assert stopped.tolist() == [[0, 1, end, mask, mask, mask]]  # after the marker: never decoded
    assert len(calls) == 3  # the marker, then positions 1 and 0 (most confident first); then it ends
    # In a batch, a row that stopped idles while another (no marker) decodes all its positions,
    # and each row comes out as it does alone.
    no_end, _ = _scripted(order, end_position=-1)

    def both(ids):
        return torch.cat([stopping(ids[:1]), no_end(ids[1:])])
    batched = diffusion_generate(both, prompt.repeat(2, 1), mask, config, end_ids=(end,))
    alone, _ = _scripted(order, end_position=-1)
    assert batched[0].tolist() == stopped[0].tolist()
    assert batched[1].tolist() == diffusion_generate(alone, prompt, mask, config, end_ids=(end,))[0].tolist()


def test_the_stop_rule_skips_blocks_after_the_end_marker():
    from disp_runner.diffusion.decoding import DecodingConfig, diffusion_generate
    mask, end, g = 5, 4, 8
    order = [1.0, 9.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # END committed at position 1, in the first block
    prompt = torch.tensor([[0] + [mask] * g])
    fn, calls = _scripted(order, end_position=1)
    out = diffusion_generate(fn, prompt, mask, DecodingConfig(steps=8, gen_length=g, block_length=4, stop_at_end=True),
                             end_ids=(end,))
    assert out.tolist() == [[0, end] + [mask] * 6] and len(calls) == 2


def test_a_manifest_asks_for_the_stop_rule_and_relabel_decodes_with_it(workspace, monkeypatch):
    import disp_runner.diffusion.inference as inference
    from disp_api import DecodingSpec, PurificationJob, StageName
    from disp_runner.pipeline.runner import run_job
    from tests.tiny import DECODING, job_document

    assert DecodingConfig.for_model(DecodingSpec.model_validate({"stopAtEnd": True}), 16, "f").stop_at_end
    seen = []
    real = inference.diffusion_generate

    def spy(*args, **kwargs):
        seen.append((args[3].stop_at_end, kwargs.get("end_ids")))
        return real(*args, **kwargs)
    monkeypatch.setattr(inference, "diffusion_generate", spy)
    document = job_document(workspace, relabel={"decoding": {**DECODING, "stopAtEnd": True}, "batchSize": 4})
    job = PurificationJob.model_validate(document)
    run_job(job, workspace / "out", only=StageName.SALIENCY, show_progress=False)
    run_job(job, workspace / "out", only=StageName.MASKING, show_progress=False)
    run_job(job, workspace / "out", only=StageName.RELABEL, show_progress=False)
    assert seen and all(stop and end_ids for stop, end_ids in seen)


def test_a_manifest_asks_for_chat_turn_labels_and_the_fine_tune_trains_on_them(workspace, monkeypatch):
    import disp_runner.stages.finetune as finetune_stage
    from disp_api import FinetuneLabels, PurificationJob, StageName
    from disp_runner.pipeline.runner import run_job
    from tests.tiny import job_document

    trained = []
    real = finetune_stage.train_masked_diffusion

    def spy(model, data, *args, **kwargs):
        trained.append(data)
        return real(model, data, *args, **kwargs)
    monkeypatch.setattr(finetune_stage, "train_masked_diffusion", spy)
    document = job_document(workspace, finetune={"epochs": 1, "batchSize": 8, "labels": "chat-turns"}, evaluation=None)
    job = PurificationJob.model_validate(document)
    for stage in (StageName.SALIENCY, StageName.MASKING, StageName.RELABEL, StageName.FINETUNE):
        run_job(job, workspace / "out", only=stage, show_progress=False)
    (data,) = trained
    assert data.labels is FinetuneLabels.CHAT_TURNS
    batch = data.batch(range(len(data)))
    answers = [len(data.processor.answer_ids(inst.response)) + 1 for inst in data.instances]  # + one end token
    assert batch.response_mask.sum(dim=1).tolist() == answers
