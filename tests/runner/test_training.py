"""Training lowers the masked-diffusion loss and touches only the parts it is told to."""

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
