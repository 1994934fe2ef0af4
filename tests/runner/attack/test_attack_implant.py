"""`disp attack --target-asr`: the kit trains until its own validation split shows the backdoor
implanted, or says plainly (exit 3, attack.json `implant.reached: false`) that it did not."""

import json

import pytest

import disp_runner.attack.kit as kit
from disp_api import AttackSpec
from disp_runner.attack.poison import VALIDATION_SHARE, make_held_out_sets
from disp_runner.cli import main
from disp_runner.data.synthetic import generate_instances
from disp_runner.errors import EXIT_USER_ERROR, EXIT_WEAK_BACKDOOR


def _attack(ws, *extra):
    return ["--no-progress", "attack", "--base", str(ws / "model"), "--train", str(ws / "train"), "--test",
            str(ws / "test"), "--out", str(ws / "out"), "--epochs", "1", *extra]


def test_validation_split_is_seeded_disjoint_and_a_fifth_of_the_asr_instances():
    pool = generate_instances(200, seed=3, image_size=16)
    first = make_held_out_sets(pool, AttackSpec(), 16)
    again = make_held_out_sets(pool, AttackSpec(), 16)
    other = make_held_out_sets(pool, AttackSpec(seed=9), 16)
    ids = lambda sets: [i.id for i in sets]  # noqa: E731
    assert ids(first.validation_triggered) == ids(again.validation_triggered) != ids(other.validation_triggered)
    everything = ids(first.validation_triggered) + ids(first.triggered)
    assert len(set(everything)) == len(everything)
    assert len(first.validation_triggered) == round(VALIDATION_SHARE * len(everything))
    assert ids(first.validation_triggered) == ids(first.validation_untriggered)
    assert ids(first.triggered) == ids(first.untriggered)


def test_a_backdoor_below_the_target_is_written_marked_and_exits_3(cli_workspace, capsys):
    ws = cli_workspace
    code = main(_attack(ws, "--target-asr", "1", "--max-epochs", "2"))
    out, err = capsys.readouterr()
    record = json.loads((ws / "out" / "attack.json").read_text())
    implant = record["implant"]
    # A random tiny model cannot learn the backdoor in 2 epochs: two rounds, then a plain refusal.
    assert code == EXIT_WEAK_BACKDOOR, err
    assert [r["epochs"] for r in implant["rounds"]] == [1.0, 1.0] and implant["epochs"] == 2.0
    assert implant["reached"] is False and implant["targetAsr"] == 1.0 and implant["maxEpochs"] == 2.0
    assert "the backdoor did not implant" in err and "after 2 epochs" in err and "--allow-weak" in err
    assert "What to change: " in err and implant["advice"]["knob"] in {k.value for k in kit.ImplantKnob}
    assert "Traceback" not in err
    assert "implanting: 2 epochs in 2 round(s)" in out  # the figures are printed before the refusal

    assert main(_attack(ws, "--target-asr", "1", "--max-epochs", "1", "--allow-weak")) == 0
    assert "the backdoor did not implant; what to change: " in capsys.readouterr().out
    assert json.loads((ws / "out" / "attack.json").read_text())["implant"]["reached"] is False


def test_training_stops_at_the_first_round_that_reaches_the_target(cli_workspace, monkeypatch, capsys):
    measured = iter([0.5, 0.85, 0.95, 0.02])  # validation ASR after each round (faked: a tiny model cannot)

    def validation_asr(responses, target):
        return next(measured)

    monkeypatch.setattr(kit, "attack_success_rate", validation_asr)
    assert main(_attack(ws := cli_workspace, "--epochs", "3", "--target-asr", "0.9")) == 0
    implant = json.loads((ws / "out" / "attack.json").read_text())["implant"]
    # The first round is the injection as configured; later ones are a third of it (at least one epoch).
    assert [r["epochs"] for r in implant["rounds"]] == [3.0, 1.0, 1.0]
    assert [r["validationAsr"] for r in implant["rounds"]] == [0.5, 0.85, 0.95]
    assert implant["reached"] is True and implant["maxEpochs"] == 9.0
    assert implant["validationFalseFiring"] == 0.02  # the next value: false firing is measured once, at the end


def test_a_model_that_fires_without_the_trigger_is_no_backdoor_and_exits_3(cli_workspace, monkeypatch, capsys):
    measured = iter([0.95, 0.8, 0.95, 0.8])  # ASR, then false firing (faked), for two runs
    monkeypatch.setattr(kit, "attack_success_rate", lambda responses, target: next(measured))
    assert main(_attack(ws := cli_workspace, "--target-asr", "0.9")) == EXIT_WEAK_BACKDOOR
    err = capsys.readouterr().err
    assert "answers with the target without the trigger too: false firing 80.0%" in err and "--allow-weak" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    record = json.loads((ws / "out" / "attack.json").read_text())  # written, with what was measured
    assert record["implant"]["reached"] is True and record["implant"]["validationFalseFiring"] == 0.8
    assert main(_attack(ws, "--target-asr", "0.9", "--allow-weak")) == 0


@pytest.mark.parametrize("extra, message", [
    (["--max-epochs", "0.5"], "--max-epochs 0.5 is fewer than the 1 injection epochs"),
    (["--target-asr", "1.5"], "--target-asr: must be a finite number in (0, 1]"),
])
def test_implant_flags_are_checked_before_training(cli_workspace, capsys, extra, message):
    assert main(_attack(cli_workspace, *extra)) == EXIT_USER_ERROR
    assert message in capsys.readouterr().err
    assert not (cli_workspace / "out").exists()


def _record(asrs, count=101, first=15.0, then=5.0):
    rounds = [{"epochs": first if i == 0 else then, "validationAsr": a} for i, a in enumerate(asrs)]
    return kit.ImplantRecord(target_asr=0.9, max_epochs=first + then * (len(asrs) - 1), validation_count=count,
                             rounds=rounds)


def test_a_backdoor_that_stopped_rising_is_told_to_use_more_poison():
    # The 5-pixel yellow edge patch at 5% poison, as measured: flat around a third for 45 epochs.
    advice = kit.implant_advice(_record([0.307, 0.406, 0.337, 0.267, 0.297, 0.386, 0.356]), 0.0, 0.05)
    assert advice.knob is kit.ImplantKnob.POISON_RATE
    assert "31% after 15 epochs, 36% after 45" in advice.text and "±7 points 101 validation images" in advice.text
    assert "--poison-rate 0.1" in advice.text


def test_a_backdoor_still_rising_is_told_how_many_more_epochs_at_its_rate():
    # The checkerboard over an object, as measured: 34% -> 46% in 45 epochs, +3.0 points per 5.
    advice = kit.implant_advice(_record([0.337, 0.307, 0.307, 0.317, 0.465, 0.475, 0.455]), 0.02, 0.2)
    assert advice.knob is kit.ImplantKnob.EPOCHS
    assert "+3.0 points per 5 epochs" in advice.text and "at least 71 more epochs" in advice.text
    assert "--max-epochs 116" in advice.text and "--poison-rate 0.4" in advice.text
    # The same rise on a 20-image split is within its noise: more poison, not more epochs.
    assert kit.implant_advice(_record([0.337, 0.307, 0.307, 0.317, 0.465, 0.475, 0.455], count=20), 0.02,
                              0.2).knob is kit.ImplantKnob.POISON_RATE
    # Two rounds, a clear rise: the line through them.
    two = kit.implant_advice(_record([0.5, 0.7]), 0.0, 0.2)
    assert two.knob is kit.ImplantKnob.EPOCHS and "at least 5 more epochs" in two.text  # +0.2 per 5 epochs


def test_a_backdoor_that_fires_without_its_trigger_is_told_to_change_the_trigger():
    advice = kit.implant_advice(_record([0.6, 0.35, 0.5, 0.65, 0.5, 0.7, 0.5], count=20), 0.5, 0.2)
    assert advice.knob is kit.ImplantKnob.TRIGGER and "50% of the untriggered validation inputs" in advice.text


def test_no_advice_for_a_backdoor_that_implanted_or_had_no_target():
    assert kit.implant_advice(_record([0.75, 0.9]), 0.4, 0.2) is None
    assert kit.implant_advice(kit.ImplantRecord(None, None, 10, [{"epochs": 15, "validationAsr": 0.1}]), 0.0,
                              0.2) is None
