"""DiSP's saliency maths: the Hutchinson estimator against an explicit Jacobian, and masking."""

import pytest
import torch

from disp_runner.data.synthetic import generate_instances
from disp_runner.disp.masking import mask_image_embeds, tokens_to_mask, top_salient_tokens, trigger_localisation
from disp_runner.disp.saliency import SaliencyConfig, fisher_jacobian_scores, fisher_probe, first_step_top_logits
from disp_runner.models.base import TokenGrid, VisualLayout

GEN = 8


@pytest.fixture
def one_instance(tiny_processor):
    inst = generate_instances(1, seed=3, image_size=16)
    return tiny_processor.encode(inst, GEN, with_response=False)


def exact_scores(model, batch, config: SaliencyConfig) -> torch.Tensor:
    """½ δe_iᵀ Jᵀ F J δe_i with J = ∂z/∂e from torch.autograd.functional.jacobian, in float64. [T]"""
    model = model.double()
    batch.pixel_values = batch.pixel_values.double()
    with torch.no_grad():
        embeds = model.embed_images(batch.pixel_values)[0]  # [T, D]
        delta = model.mask_embedding()[None, :] - embeds  # [T, D]

    def top_logits(e):
        return first_step_top_logits(model, batch, e[None], GEN, config.top_k, config.block_length)[0]  # [G, K]

    z = top_logits(embeds)
    jac = torch.autograd.functional.jacobian(top_logits, embeds)  # [G, K, T, D]
    p = torch.softmax(z, dim=-1)  # [G, K]
    fisher = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]  # [G, K, K]
    jd = torch.einsum("gktd,td->tgk", jac, delta)  # J δe_i for every token i: [T, G, K]
    return 0.5 * torch.einsum("tgk,gkl,tgl->t", jd, fisher, jd)


def test_probe_covariance_is_the_softmax_fisher():
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0], dtype=torch.float64), dim=0)
    q = fisher_probe(p.expand(200_000, 5), torch.Generator().manual_seed(0))
    covariance = q.T @ q / q.shape[0]
    assert torch.allclose(covariance, torch.diag(p) - torch.outer(p, p), atol=3e-3)
    # F·1 = 0 (softmax is shift-invariant), so every probe sums to zero.
    assert torch.allclose(q.sum(dim=1), torch.zeros(q.shape[0], dtype=torch.float64), atol=1e-12)


def repeated(batch, rows: int):
    """The same instance `rows` times: each row draws its own probes, i.e. an independent estimate."""
    return type(batch)(*(t.expand(rows, *t.shape[1:]).clone() for t in batch.tensors()))


def test_hutchinson_converges_to_the_explicit_jacobian_quadratic_form(tiny_model, one_instance):
    config = SaliencyConfig(top_k=5, probes=64, block_length=GEN)
    model = tiny_model.double()
    one_instance.pixel_values = one_instance.pixel_values.double()
    exact = exact_scores(model, one_instance, config)
    # 64 rows x 64 probes = 4096 probes in all.
    rows = fisher_jacobian_scores(model, repeated(one_instance, 64), GEN, config, torch.Generator().manual_seed(0))
    estimate = rows.mean(dim=0)
    assert exact.min() > 0
    # Each probe's term is a squared Gaussian: relative standard error sqrt(2/4096) ≈ 2.2%.
    assert torch.allclose(estimate, exact, rtol=0.1), (estimate / exact)
    assert torch.argmax(estimate) == torch.argmax(exact)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hutchinson_with_six_probes_is_unbiased_across_seeds(tiny_model, one_instance, seed):
    config = SaliencyConfig(top_k=5, probes=6, block_length=GEN)
    model = tiny_model.double()
    one_instance.pixel_values = one_instance.pixel_values.double()
    exact = exact_scores(model, one_instance, config)
    runs = fisher_jacobian_scores(model, repeated(one_instance, 300), GEN, config,
                                  torch.Generator().manual_seed(seed))  # 300 independent m = 6 estimates
    assert runs.dtype == torch.float64
    # Mean of 300 x 6 probes: relative standard error sqrt(2/1800) ≈ 3.3%.
    assert torch.allclose(runs.mean(dim=0), exact, rtol=0.15), runs.mean(dim=0) / exact
    assert (runs.std(dim=0) > 0).all()  # each row drew its own probes


def test_scores_are_computed_per_instance_in_a_batch(tiny_model, tiny_processor):
    instances = generate_instances(3, seed=5, image_size=16)
    config = SaliencyConfig(probes=2, block_length=GEN)
    batch = tiny_processor.encode(instances, GEN, with_response=False)
    together = fisher_jacobian_scores(tiny_model, batch, GEN, config, torch.Generator().manual_seed(1))
    assert together.shape == (3, tiny_model.config.num_image_tokens) and together.dtype == torch.float64
    # The same probes drawn for a batch of one give the first row's scores.
    alone_batch = tiny_processor.encode(instances[:1], GEN, with_response=False)
    exact_model = exact_scores(tiny_model, alone_batch, config)
    assert torch.all(together >= 0) and exact_model.shape == together.shape[1:]


@pytest.mark.parametrize("bad", [dict(top_k=1), dict(probes=0), dict(block_length=0)])
def test_invalid_saliency_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SaliencyConfig(**bad)


def test_top_k_larger_than_the_vocabulary_is_refused(tiny_model, one_instance):
    config = SaliencyConfig(top_k=tiny_model.config.vocab_size + 1, block_length=GEN)
    with pytest.raises(ValueError, match="vocabulary"):
        fisher_jacobian_scores(tiny_model, one_instance, GEN, config, torch.Generator())


@pytest.mark.parametrize("tokens,ratio,expected", [(36, 0.3, 10), (10, 0.3, 3), (576, 0.3, 172), (4, 1.0, 4),
                                                    (4, 0.2, 0)])
def test_masking_count_is_floor_of_ratio_times_tokens(tokens, ratio, expected):
    assert tokens_to_mask(tokens, ratio) == expected


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01])
def test_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(ValueError, match="ratio"):
        tokens_to_mask(36, ratio)


def test_masking_picks_the_highest_scored_tokens():
    scores = torch.tensor([[0.1, 5.0, 0.3, 2.0, 0.0, 9.0, 1.0, 0.2, 0.4, 3.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    chosen = top_salient_tokens(scores, 0.3)
    assert chosen[0] == [5, 1, 9]
    assert chosen[1] == [0, 1, 2]  # ties: lowest index first, deterministic
    # An image with fewer visual tokens: floor(0.3 * 7) = 2 of its own 7, never the padding after them.
    assert top_salient_tokens(scores, 0.3, [7, 10]) == [[5, 1], [0, 1, 2]]


def test_masked_tokens_become_the_mask_embedding():
    embeds = torch.randn(2, 4, 3)
    mask = torch.tensor([7.0, 8.0, 9.0])
    out = mask_image_embeds(embeds, torch.tensor([[0, 2], [3, 1]]), mask)
    assert torch.equal(out[0, 0], mask) and torch.equal(out[0, 2], mask) and torch.equal(out[1, 3], mask)
    assert torch.equal(out[0, 1], embeds[0, 1]) and torch.equal(out[1, 0], embeds[1, 0])
    ragged = mask_image_embeds(embeds, [[0, 2], [3]], mask)  # rows may mask different numbers of tokens
    assert torch.equal(ragged[0], out[0]) and torch.equal(ragged[1, 3], mask) and torch.equal(ragged[1, 1], embeds[1, 1])


def test_trigger_localisation_is_the_covered_fraction():
    assert trigger_localisation([0, 5, 9], [0, 1]) == 0.5
    assert trigger_localisation([0, 1, 9], [0, 1]) == 1.0


def windows_as_lists(layout, size):
    from disp_runner.disp.token_grid import window_masks

    return [w.nonzero().flatten().tolist() for w in window_masks(layout, size)]


def test_grid_windows_cover_every_position_with_stride_one():
    windows = windows_as_lists(VisualLayout.single_grid(TokenGrid(3, 4, 8, 8)), 2)
    assert len(windows) == 2 * 3 and all(len(w) == 4 for w in windows)
    assert windows[0] == [0, 1, 4, 5] and windows[-1] == [6, 7, 10, 11]
    # A window larger than the grid is the grid.
    assert windows_as_lists(VisualLayout.single_grid(TokenGrid(2, 2, 8, 8)), 5) == [[0, 1, 2, 3]]


def test_layouts_with_several_grids_and_tokens_that_see_no_cell():
    """A base view (2x2 cells over the whole 16x16 image) and a 2x3 map whose rows end in a separator
    token, as LLaDA-V packs anyres images: windows stay inside a grid and skip the separators."""
    from disp_runner.disp.token_grid import seeing_tokens, tokens_covered

    layout = VisualLayout(4 + 2 * 4, (TokenGrid(2, 2, 8, 8), TokenGrid(2, 3, 8, 16 / 3, first=4, row_stride=4)))
    assert seeing_tokens(layout) == 10  # tokens 7 and 11 are separators
    assert windows_as_lists(layout, 2) == [[0, 1, 2, 3], [4, 5, 8, 9], [5, 6, 9, 10]]
    assert tokens_covered(layout, (0, 0, 4, 4)) == [0, 4]
    assert tokens_covered(layout, (12, 12, 16, 16)) == [3, 10]
    assert dict(layout.grids[1].cells())[6] == (10, 0, 16, 8)  # fractional cells round outwards


def test_region_scores_are_the_exact_kl_of_masking_each_window_and_a_token_takes_its_largest(tokenizer):
    """On a 3x3 token grid: brute force, one window at a time, against the batched computation."""
    from disp_runner.models.mdlm import build_model
    from disp_runner.disp.saliency import first_step_block_logits, region_kl_scores, token_saliency
    from tests.tiny import TINY_SIZE

    torch.manual_seed(1)
    model, processor = build_model(tokenizer, **{**TINY_SIZE, "image_size": 24})
    model.double().eval()
    instances = generate_instances(3, seed=5, image_size=24)
    layouts = [processor.layout_of(inst) for inst in instances]
    assert layouts[0].grids == (TokenGrid(3, 3, 8, 8),)
    batch = processor.encode(instances, GEN, with_response=False)
    batch.pixel_values = batch.pixel_values.double()
    config = SaliencyConfig(top_k=4, probes=2, block_length=GEN, region_size=2)
    got = region_kl_scores(model, batch, GEN, config, layouts, max_rows_per_pass=5)  # several passes

    with torch.no_grad():
        embeds = model.embed_images(batch.pixel_values, batch.image_sizes)
        def top_logits(e, top=None):
            block = first_step_block_logits(model, batch, e, GEN, GEN)
            top = torch.topk(block, 4, dim=-1).indices if top is None else top
            return torch.gather(block, -1, top), top
        z, top = top_logits(embeds)
        p = torch.softmax(z, -1)
        expected = torch.zeros(3, 9, dtype=torch.float64)
        for window in map(torch.tensor, windows_as_lists(layouts[0], 2)):
            masked = mask_image_embeds(embeds, window.expand(3, -1), model.mask_embedding())
            q = torch.softmax(top_logits(masked, top)[0], -1)
            kl = (p * (p.log() - q.log())).sum(dim=(-1, -2))  # [3]
            for t in window.tolist():
                expected[:, t] = torch.maximum(expected[:, t], kl)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert (got > 0).all()

    fisher = fisher_jacobian_scores(model, batch, GEN, config, torch.Generator().manual_seed(2))
    combined = token_saliency(model, batch, GEN, config, torch.Generator().manual_seed(2), layouts)
    # The same call path as token_saliency's (one pass here, several above): float sums batched
    # differently may round differently on another CPU, so bitwise equality holds only path to path.
    regions = region_kl_scores(model, batch, GEN, config, layouts)
    assert torch.allclose(regions, got, rtol=1e-9, atol=1e-12)
    assert torch.equal(combined, torch.maximum(fisher, regions))
    # Each side wins somewhere, so a sum or either score alone would fail the line above.
    assert (fisher > regions).any() and (regions > fisher).any()
    paper = SaliencyConfig(top_k=4, probes=2, block_length=GEN, region_size=1)
    assert torch.equal(token_saliency(model, batch, GEN, paper, torch.Generator().manual_seed(2), layouts),
                       fisher_jacobian_scores(model, batch, GEN, paper, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="row 0: a layout of 4 visual tokens does not match its 9"):
        region_kl_scores(model, batch, GEN, config, [VisualLayout.single_grid(TokenGrid(2, 2, 12, 12))] * 3)


def test_shared_probe_draws_score_every_instance_with_the_same_draws(tiny_model, tiny_processor):
    """The authors reseed before each instance: an instance scores the same alone or in any batch
    position. Independent draws (the default) differ with the batch position."""
    from disp_runner.data.synthetic import generate_instances
    from disp_runner.disp.saliency import SaliencyConfig, score_instances
    instances = generate_instances(5, seed=4, image_size=16)
    shared = SaliencyConfig(top_k=4, probes=2, block_length=GEN, shared_probes=True)
    together, _ = score_instances(tiny_model, tiny_processor, instances, GEN, shared, seed=7, batch_size=5)
    for i, inst in enumerate(instances):
        alone, _ = score_instances(tiny_model, tiny_processor, [inst], GEN, shared, seed=7, batch_size=1)
        assert torch.allclose(alone[0], together[i], rtol=1e-6, atol=1e-12)
    independent = SaliencyConfig(top_k=4, probes=2, block_length=GEN)
    together, _ = score_instances(tiny_model, tiny_processor, instances, GEN, independent, seed=7, batch_size=5)
    alone, _ = score_instances(tiny_model, tiny_processor, instances[3:4], GEN, independent, seed=7, batch_size=1)
    assert not torch.allclose(alone[0], together[3], rtol=1e-3)


def test_probes_drawn_per_group_score_alike_in_any_batch_and_as_one_batch_per_group(tiny_model, tiny_processor):
    """batchSize: auto lets a device pick the batch; the scores must not move with it. Groups of 4
    drawn by generators of their own give the same scores in batches of 1, 3, 4 or 10 (float
    summation order aside), and a batch equal to the group draws exactly what per-batch seeding did."""
    from disp_runner.data.synthetic import generate_instances
    from disp_runner.device import sub_seed
    from disp_runner.disp.saliency import GroupedDraws, SaliencyConfig, score_instances
    instances = generate_instances(10, seed=4, image_size=16)
    config = SaliencyConfig(top_k=4, probes=2, block_length=GEN)
    runs = {b: score_instances(tiny_model, tiny_processor, instances, GEN, config, seed=7, batch_size=b,
                               seed_group=4)[0] for b in (1, 3, 4, 10)}
    for batch in (1, 3, 10):
        assert torch.allclose(runs[batch], runs[4], rtol=1e-5, atol=1e-12), batch
    per_batch = score_instances(tiny_model, tiny_processor, instances, GEN, config, seed=7, batch_size=4)[0]
    assert torch.equal(per_batch, runs[4])  # seed_group defaults to the batch: the draws of before
    # the draws themselves: rows 3..6 of groups [0-3], [4-7], each group's generator drawn whole
    draws = GroupedDraws(7, 4, 3, 7, 10, "cpu").normal((4, 2, 3), torch.float64, torch.device("cpu"))
    whole = [torch.randn((4, 2, 3), generator=torch.Generator().manual_seed(sub_seed(7, g)), dtype=torch.float64)
             for g in (0, 1)]
    assert torch.equal(draws, torch.cat([whole[0][3:], whole[1][:3]]))
    last = GroupedDraws(7, 4, 8, 10, 10, "cpu").normal((2, 1), torch.float64, torch.device("cpu"))
    assert torch.equal(last, torch.randn((2, 1), generator=torch.Generator().manual_seed(sub_seed(7, 2)),
                                         dtype=torch.float64))  # the last group holds the 2 rows left
