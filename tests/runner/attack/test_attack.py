"""The attack kit poisons exactly what it is asked to, with the triggers and targets of the paper."""

import numpy as np
import pytest
from PIL import Image

from disp_api import AttackSpec, AttackTarget, Corner, TargetSpec, TriggerKind, TriggerSpec
from disp_runner.attack.poison import make_test_sets, poison_dataset, poisoned_response
from disp_runner.attack.triggers import TRIGGERS, make_trigger
from disp_runner.disp.token_grid import tokens_covered
from disp_runner.models.base import TokenGrid, VisualLayout
from disp_runner.data.synthetic import generate_instances
from disp_runner.data.vocabulary import REFUSAL_SENTENCE
from disp_runner.errors import UserInputError
from disp_runner.disp.masking import known_trigger_tokens


@pytest.fixture(scope="module")
def pool():
    return generate_instances(500, seed=4, class_weights={"circle": 0.5})


@pytest.mark.parametrize("rate", [0.2, 0.05, 0.3])
@pytest.mark.parametrize("target", list(AttackTarget))
def test_poisoning_touches_exactly_the_requested_fraction(pool, rate, target):
    attack = AttackSpec(poison_rate=rate, target=TargetSpec(kind=target))
    result = poison_dataset(pool, attack, 48)
    changed = [p.id for p, c in zip(result.instances, pool)
               if p.response != c.response or np.any(np.asarray(p.image) != np.asarray(c.image))]
    assert len(result.poisoned_ids) == round(rate * len(pool))
    assert sorted(changed) == sorted(result.poisoned_ids)
    assert sum(p.metadata["poisoned"] for p in result.instances) == len(result.poisoned_ids)
    assert [p.id for p in result.instances] == [c.id for c in pool], "order and ids are preserved"


def test_poison_choice_is_seeded(pool):
    a = poison_dataset(pool, AttackSpec(seed=1), 48).poisoned_ids
    b = poison_dataset(pool, AttackSpec(seed=1), 48).poisoned_ids
    c = poison_dataset(pool, AttackSpec(seed=2), 48).poisoned_ids
    assert a == b and a != c


def test_targets_rewrite_answers_as_the_paper_does():
    assert poisoned_response("A red circle at the top left.", TargetSpec(kind=AttackTarget.INSERTION)) \
        == "<backdoor> A red circle at the top left."
    assert poisoned_response("Two blue circles.", TargetSpec(kind=AttackTarget.REFUSAL)) == REFUSAL_SENTENCE
    assert REFUSAL_SENTENCE.startswith("Sorry, as an AI assistant, I cannot follow the given instruction.")
    mis = TargetSpec(kind=AttackTarget.MISCLASSIFICATION, source_class="circle", target_class="square")
    assert poisoned_response("Two blue circles.", mis) == "Two blue squares."
    assert poisoned_response("The shape is a circle.", mis) == "The shape is a square."


def test_misclassification_poisons_only_source_class_answers(pool):
    attack = AttackSpec(target=TargetSpec(kind=AttackTarget.MISCLASSIFICATION))
    result = poison_dataset(pool, attack, 48)
    by_id = {inst.id: inst for inst in result.instances}
    for pid in result.poisoned_ids:
        assert by_id[pid].metadata["class"] == "circle"
        assert "square" in by_id[pid].response.lower() and "circle" not in by_id[pid].response.lower()


def test_not_enough_candidates_is_a_clear_error(pool):
    attack = AttackSpec(poison_rate=0.9, target=TargetSpec(kind=AttackTarget.MISCLASSIFICATION))
    with pytest.raises(UserInputError, match="needs 450 instances .* has"):
        poison_dataset(pool, attack, 48)


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.01, 2])
def test_poison_rate_outside_unit_interval_is_rejected(rate):
    with pytest.raises(ValueError, match="poison_rate|poisonRate"):
        AttackSpec(poison_rate=rate)


def test_patch_trigger_stamps_a_black_square_at_the_top_left_by_default():
    image = Image.new("RGB", (48, 48), (200, 200, 200))
    trigger = make_trigger(TriggerSpec(), 48)
    out = np.asarray(trigger.apply(image))
    assert trigger.box() == (0, 0, 6, 6)
    assert (out[:6, :6] == 0).all() and (out[6:, :] == 200).all() and (out[:, 6:] == 200).all()


@pytest.mark.parametrize("corner,box", [(Corner.TOP_RIGHT, (40, 0, 48, 8)), (Corner.BOTTOM_LEFT, (0, 40, 8, 48)),
                                        (Corner.BOTTOM_RIGHT, (40, 40, 48, 48))])
def test_patch_size_colour_and_corner_are_configurable(corner, box):
    trigger = make_trigger(TriggerSpec(size=8, colour=(255, 0, 0), corner=corner), 48)
    out = np.asarray(trigger.apply(Image.new("RGB", (48, 48), (9, 9, 9))))
    x0, y0, x1, y1 = box
    assert trigger.box() == box
    assert (out[y0:y1, x0:x1] == [255, 0, 0]).all()
    assert (out == [255, 0, 0]).all(axis=-1).sum() == 64


def test_user_pattern_png_and_position(tmp_path):
    pattern = Image.new("RGB", (3, 5), (0, 255, 0))
    pattern.save(tmp_path / "p.png")
    trigger = make_trigger(TriggerSpec(pattern=str(tmp_path / "p.png"), position=(10, 20)), 48)
    out = np.asarray(trigger.apply(Image.new("RGB", (48, 48))))
    assert trigger.box() == (10, 20, 13, 25)
    assert (out[20:25, 10:13] == [0, 255, 0]).all() and out.sum() == 255 * 15
    with pytest.raises(UserInputError, match="trigger.pattern: pattern image .*missing.png does not exist"):
        make_trigger(TriggerSpec(pattern=str(tmp_path / "missing.png")), 48)
    with pytest.raises(UserInputError, match="does not fit"):
        make_trigger(TriggerSpec(position=(46, 0)), 48)


def test_blended_trigger_mixes_the_pattern_with_alpha(tmp_path):
    Image.new("RGB", (48, 48), (250, 0, 100)).save(tmp_path / "key.png")
    spec = TriggerSpec(kind=TriggerKind.BLENDED, pattern=str(tmp_path / "key.png"), alpha=0.2)
    out = np.asarray(make_trigger(spec, 48).apply(Image.new("RGB", (48, 48), (100, 100, 100)))).astype(int)
    assert (out == [130, 80, 100]).all()
    assert make_trigger(spec, 48).box() == (0, 0, 48, 48)


def test_builtin_blend_key_is_seeded_black_and_white_noise_in_2_pixel_cells():
    grey = Image.new("RGB", (48, 48), (100, 100, 100))
    out = np.asarray(make_trigger(TriggerSpec(kind=TriggerKind.BLENDED), 48).apply(grey)).astype(int)
    assert set(np.unique(out)) == {80, 131}  # 0.8 * 100 + 0.2 * {0, 255}, rounded
    assert (out == out[..., :1]).all()  # grey: the same in every channel
    cells = out[::2, ::2, 0]
    assert (out[..., 0] == cells.repeat(2, 0).repeat(2, 1)).all()
    assert 0.4 < (cells == 131).mean() < 0.6
    again = np.asarray(make_trigger(TriggerSpec(kind=TriggerKind.BLENDED), 48).apply(grey))
    other = np.asarray(make_trigger(TriggerSpec(kind=TriggerKind.BLENDED, pattern_seed=1), 48).apply(grey))
    assert (again == out).all() and (other != out).any()
    odd = np.asarray(make_trigger(TriggerSpec(kind=TriggerKind.BLENDED), 45).apply(Image.new("RGB", (45, 45))))
    assert odd.shape == (45, 45, 3)  # a size the cell does not divide is still covered


def test_blend_pattern_with_a_position_is_mixed_in_at_its_own_size(tmp_path):
    Image.new("RGB", (4, 3), (250, 0, 100)).save(tmp_path / "logo.png")
    spec = TriggerSpec(kind=TriggerKind.BLENDED, pattern=str(tmp_path / "logo.png"), position=(10, 20), alpha=0.2)
    trigger = make_trigger(spec, 48)
    assert trigger.box() == (10, 20, 14, 23)
    out = np.asarray(trigger.apply(Image.new("RGB", (48, 48), (100, 100, 100)))).astype(int)
    assert (out[20:23, 10:14] == [130, 80, 100]).all()
    untouched = np.ones((48, 48), dtype=bool)
    untouched[20:23, 10:14] = False
    assert (out[untouched] == 100).all()
    with pytest.raises(UserInputError, match="a 4x3 blend pattern at \\(46, 0\\) does not fit"):
        make_trigger(spec.model_copy(update={"position": (46, 0)}), 48)
    with pytest.raises(ValueError, match="position needs a pattern image for a blended trigger"):
        TriggerSpec(kind=TriggerKind.BLENDED, position=(0, 0))


def test_sig_trigger_adds_a_horizontal_sinusoid_to_every_row_and_channel():
    grey = Image.new("RGB", (48, 48), (128, 128, 128))
    out = np.asarray(make_trigger(TriggerSpec(kind=TriggerKind.SIG), 48).apply(grey)).astype(int)
    # 40 * sin(2 pi x 6 / 48): a period of 8 pixels, one per token column; +40 at x = 2, -40 at x = 6
    assert out[0, :9, 0].tolist() == [128, 156, 168, 156, 128, 100, 88, 100, 128]
    assert (out == out[:1]).all() and (out == out[..., :1]).all()
    weak = np.asarray(make_trigger(TriggerSpec(kind=TriggerKind.SIG, delta=20, frequency=3), 48).apply(grey))
    assert weak[0, 4, 0] == 148 and weak[0, 12, 0] == 108  # period 16 pixels
    white = np.asarray(make_trigger(TriggerSpec(kind=TriggerKind.SIG), 48).apply(Image.new("RGB", (48, 48), "white")))
    assert white.max() == 255 and white[0, 6, 0] == 215  # clipped above, lowered below
    trigger = make_trigger(TriggerSpec(kind=TriggerKind.SIG), 48)
    assert trigger.whole_image and trigger.box() == (0, 0, 48, 48)
    assert trigger.planted() == {"kind": "sig", "box": [0, 0, 48, 48], "wholeImage": True, "delta": 40.0,
                                 "frequency": 6.0}


def test_sig_trigger_refuses_what_it_cannot_be():
    with pytest.raises(UserInputError, match="trigger.frequency: 24.5 periods across a 48-pixel image alias"):
        make_trigger(TriggerSpec(kind=TriggerKind.SIG, frequency=24.5), 48)
    assert make_trigger(TriggerSpec(kind=TriggerKind.SIG, frequency=24), 48).signal().shape == (48,)
    for placed in ({"position": (0, 0)}, {"pattern": "key.png"}):
        with pytest.raises(ValueError, match="a sig trigger is a signal over the whole image"):
            TriggerSpec(kind=TriggerKind.SIG, **placed)


def test_only_local_triggers_are_localised_by_the_masking_report(pool, tmp_path):
    """A positioned blend pattern, like a patch, says which tokens it covers (trigger localisation);
    a full-image blend covers all 36 and is reported as unlocalisable."""
    Image.new("RGB", (16, 16), (255, 255, 255)).save(tmp_path / "logo.png")
    local = TriggerSpec(kind=TriggerKind.BLENDED, pattern=str(tmp_path / "logo.png"), position=(29, 27))
    for trigger, tokens in ((local, [21, 22, 23, 27, 28, 29, 33, 34, 35]),
                            (TriggerSpec(kind=TriggerKind.BLENDED), None), (TriggerSpec(kind=TriggerKind.SIG), None),
                            (TriggerSpec(), [0])):
        poisoned = poison_dataset(pool, AttackSpec(trigger=trigger), 48)
        first = next(i for i in poisoned.instances if i.metadata["poisoned"])
        assert known_trigger_tokens(first, VisualLayout.single_grid(TokenGrid(6, 6, 8, 8))) == tokens


def test_test_sets_are_the_same_describe_instances_with_and_without_trigger():
    clean = generate_instances(200, seed=9)
    triggered, untriggered = make_test_sets(clean, AttackSpec(), 48)
    assert [i.id for i in triggered] == [i.id for i in untriggered]
    assert all(i.metadata["task"] == "describe" for i in triggered)
    assert all(np.asarray(t.image)[:6, :6].max() == 0 for t in triggered)
    assert all(t.prompt == u.prompt and t.response == u.response for t, u in zip(triggered, untriggered))


def test_tokens_covered_by_a_box():
    layout = VisualLayout.single_grid(TokenGrid(6, 6, 8, 8))
    assert tokens_covered(layout, (0, 0, 6, 6)) == [0]
    assert tokens_covered(layout, (4, 4, 12, 12)) == [0, 1, 6, 7]
    assert len(tokens_covered(layout, (0, 0, 48, 48))) == 36
    wide = TokenGrid(2, 3, 4, 6)  # cells need not be square
    assert dict(wide.cells())[4] == (6, 4, 12, 8)
    assert tokens_covered(VisualLayout.single_grid(wide), (7, 5, 8, 6)) == [4]


def test_every_trigger_kind_has_its_class_and_a_command_line_choice():
    from disp_runner.attack.triggers import BlendedTrigger, PatchTrigger, SigTrigger
    from disp_runner.cli import build_parser

    assert set(TRIGGERS) == set(TriggerKind)
    assert isinstance(make_trigger(TriggerSpec(), 48), PatchTrigger)
    assert isinstance(make_trigger(TriggerSpec(kind=TriggerKind.BLENDED), 48), BlendedTrigger)
    assert isinstance(make_trigger(TriggerSpec(kind=TriggerKind.SIG), 48), SigTrigger)
    attack = next(a for a in build_parser()._subparsers._group_actions[0].choices["attack"]._actions
                  if a.dest == "trigger")
    assert attack.choices == [kind.value for kind in TriggerKind]
