"""Training lowers the masked-diffusion loss and touches only the parts it is told to."""

import pytest
import torch

from disp_runner.models.loading import load_model
from disp_runner.data.synthetic import generate_instances
from disp_runner.models.mdlm.pretrain import PretrainConfig, pretrain
from disp_runner.diffusion.training import TrainableParts, TrainingConfig, train_masked_diffusion

from tests.tiny import TINY_SIZE


def test_pretrain_command_trains_and_saves(tmp_path):
    config = PretrainConfig(vision_instances=256, vision_epochs=2, num_instances=256, epochs=6, learning_rate=3e-3,
                            batch_size=32)
    result = pretrain(tmp_path / "base", config, show_progress=False, size_overrides=TINY_SIZE)
    assert result.vision.steps == 4 and set(result.vision.accuracy) == {"class", "colour", "count", "occupancy", "cells"}
    assert result.language.steps == 48
    assert result.language.last_loss < 0.7 * result.language.first_loss, result.language
    model, processor = load_model(tmp_path / "base")
    assert processor.image_size == TINY_SIZE["image_size"] and processor.mask_token_id == model.config.mask_token_id


def test_projector_only_fine_tune_leaves_everything_else_untouched(tiny_model, tiny_processor):
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    data = tiny_processor.encode(generate_instances(64, 1, image_size=16), 16)
    train_masked_diffusion(tiny_model, data, tiny_processor.mask_token_id, TrainingConfig(epochs=1, learning_rate=1e-2, batch_size=16,
                                                            trainable=TrainableParts.PROJECTOR), show_progress=False)
    changed = {name for name, p in tiny_model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("projector.") for name in changed), changed
    assert not any(p.requires_grad for p in tiny_model.parameters()), "weights are frozen again afterwards"


def test_training_is_reproducible_by_seed(tokenizer):
    from disp_runner.models.mdlm import build_model

    processor = build_model(tokenizer, **TINY_SIZE)[1]
    data = processor.encode(generate_instances(32, 1, image_size=16), 16)
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(tokenizer, **TINY_SIZE)[0]
        losses.append(train_masked_diffusion(model, data, processor.mask_token_id, TrainingConfig(epochs=2, batch_size=8, seed=5,
                                                                         trainable=TrainableParts.ALL),
                                             show_progress=False).losses)
    assert losses[0] == losses[1]


def test_trainable_parts_select_the_right_weights(tiny_model):
    from disp_runner.diffusion.training import select_trainable

    def trainable_prefixes(parts):
        select_trainable(tiny_model, parts)
        return {name.split(".")[0] for name, p in tiny_model.named_parameters() if p.requires_grad}

    assert trainable_prefixes(TrainableParts.PROJECTOR) == {"projector"}
    assert trainable_prefixes(TrainableParts.PROJECTOR_AND_LM) == {"projector", "embed_tokens", "layers", "norm",
                                                                    "lm_head"}
    assert "vision_encoder" in trainable_prefixes(TrainableParts.ALL)


class Interrupted(Exception):
    pass


def test_an_interrupted_fine_tune_resumes_from_its_last_epoch_checkpoint(tmp_path, tokenizer):
    from disp_runner.models.mdlm import build_model

    def fresh():
        torch.manual_seed(0)
        return build_model(tokenizer, **TINY_SIZE)[0]

    processor = build_model(tokenizer, **TINY_SIZE)[1]
    data = processor.encode(generate_instances(40, 1, image_size=16), 16)
    mask_id = processor.mask_token_id
    config = TrainingConfig(epochs=3, batch_size=16, learning_rate=1e-2, seed=3, trainable=TrainableParts.PROJECTOR)
    uninterrupted = fresh()
    train_masked_diffusion(uninterrupted, data, mask_id, config, show_progress=False)

    def crash_after_epoch_two(epoch):
        if epoch == 2:
            raise Interrupted

    checkpoints = tmp_path / "ckpt"
    killed = fresh()
    try:
        train_masked_diffusion(killed, data, mask_id, config, show_progress=False, checkpoint_dir=checkpoints,
                               on_epoch_end=crash_after_epoch_two)
    except Interrupted:
        pass
    assert [p.name for p in checkpoints.iterdir()] == ["epoch-0002"]  # only the last one is kept
    resumed_epochs = []
    resumed = fresh()  # a new process: the weights come back from the checkpoint
    result = train_masked_diffusion(resumed, data, mask_id, config, show_progress=False, checkpoint_dir=checkpoints,
                                    on_epoch_end=resumed_epochs.append)
    assert resumed_epochs == [3], "epochs 1-2 were not redone"
    assert result.steps == 9 and len(result.losses) == 9
    for (name, a), b in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert list((checkpoints / "epoch-0003").glob("*.safetensors")) and not list(checkpoints.rglob("*.bin"))


def test_visual_token_masking_masks_up_to_the_ratio():
    from disp_runner.models.mdlm.augmentation import random_token_mask

    pixels = torch.rand(64, 3, 16, 16)
    mask = random_token_mask(pixels, 8, 0.5, torch.Generator().manual_seed(0))
    assert mask.shape == (64, 4) and mask.dtype == torch.bool
    assert mask.sum(dim=1).max() <= 2 and mask.any()


def test_length_grouped_batches_cover_the_epoch_once_and_pad_far_less():
    from disp_runner.diffusion.training import epoch_batches

    lengths = torch.randint(100, 400, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    draw = lambda lengths=None: [b.tolist() for b in epoch_batches(300, 8, torch.Generator().manual_seed(3), lengths)]  # noqa: E731
    grouped, plain = draw(lengths), draw()
    assert sorted(i for b in grouped for i in b) == list(range(300)) and grouped == draw(lengths)
    # Without lengths: exactly the shuffled DataLoader draw the loop always made.
    loader = torch.utils.data.DataLoader(range(300), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
    assert plain == [b.tolist() for b in loader]

    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    assert padding(grouped) < padding(plain) / 5


def test_cutting_the_shared_padding_leaves_every_logit_as_it_was():
    from PIL import Image

    from tests.runner.models.test_llada_v import tiny_checkpoint

    model, processor = tiny_checkpoint(None)
    instances = [inst.replace(image=Image.new("RGB", size)) for inst, size in
                 zip(generate_instances(2, seed=4, image_size=16), [(16, 16), (40, 20)])]
    batch = processor.encode(instances, 24, pad_to=200)  # 200 positions, most of them padding in both rows
    cut = batch.trim_left(batch.first_real_column())
    assert cut.input_ids.shape[1] < 200 and int(cut.attention_mask[:, 0].max()) == 1
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, image_sizes=batch.image_sizes,
                     attention_mask=batch.attention_mask, visual_spans=batch.visual_spans, logits_at=slice(-24, None))
        short = model(input_ids=cut.input_ids, pixel_values=cut.pixel_values, image_sizes=cut.image_sizes,
                      attention_mask=cut.attention_mask, visual_spans=cut.visual_spans, logits_at=slice(-24, None))
    assert torch.allclose(full, short, atol=1e-5)
    try:
        cut.trim_left(1)
    except ValueError as exc:
        assert "real tokens" in str(exc)
    else:
        raise AssertionError("cutting a real token must be refused")


def test_a_grouped_fine_tune_trains_on_batches_no_longer_than_their_longest_row():
    from PIL import Image

    from disp_runner.models.base import EncodedInstances
    from tests.runner.models.test_llada_v import tiny_checkpoint

    model, processor = tiny_checkpoint(None)
    sizes = [(16, 16), (40, 20), (28, 28), (56, 56)]
    instances = [inst.replace(image=Image.new("RGB", sizes[i % 4], (i * 9 % 255, 40, 90)))
                 for i, inst in enumerate(generate_instances(32, seed=5, image_size=16))]
    data = EncodedInstances(processor, instances, 24)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    result = train_masked_diffusion(model, data, processor.mask_token_id,
                                    TrainingConfig(epochs=2, batch_size=4, group_by_length=True), show_progress=False)
    assert result.steps == 16 and all(torch.isfinite(torch.tensor(result.losses)))
    assert min(seen) < data.length == max(data.lengths) and len(set(seen)) > 1


def test_activation_checkpointing_trains_to_the_same_weights_and_is_refused_where_unsupported(tiny_model,
                                                                                               tiny_processor):
    from PIL import Image

    from disp_runner.errors import UserInputError
    from disp_runner.models.base import EncodedInstances
    from tests.runner.models.test_llada_v import tiny_checkpoint

    trained = []
    for checkpointing in (False, True):
        model, processor = tiny_checkpoint(None)
        instances = [inst.replace(image=Image.new("RGB", (40, 20), (i * 7 % 255, 30, 60)))
                     for i, inst in enumerate(generate_instances(16, seed=6, image_size=16))]
        result = train_masked_diffusion(model, EncodedInstances(processor, instances, 24), processor.mask_token_id,
                                        TrainingConfig(epochs=2, batch_size=8, learning_rate=1e-2,
                                                       activation_checkpointing=checkpointing), show_progress=False)
        on = model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing") \
            else model.is_gradient_checkpointing
        assert not on  # off again after training
        trained.append((result.losses, model.model.mm_projector[0].weight.detach().clone()))
    (losses_a, weights_a), (losses_b, weights_b) = trained
    assert losses_a == pytest.approx(losses_b, rel=1e-5) and torch.allclose(weights_a, weights_b, atol=1e-6)
    assert not torch.equal(weights_a, tiny_checkpoint(None)[0].model.mm_projector[0].weight)

    data = tiny_processor.encode(generate_instances(16, 1, image_size=16), 16)  # the embedded family: no support
    with pytest.raises(UserInputError, match=r"spec.finetune.activationCheckpointing: the 'disp_mdlm' model family"):
        train_masked_diffusion(tiny_model, data, tiny_processor.mask_token_id,
                               TrainingConfig(epochs=1, batch_size=8, activation_checkpointing=True), show_progress=False)
