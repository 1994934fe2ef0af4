"""Poisoning a clean dataset and building the held-out triggered / untriggered test sets."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from disp_api import AttackSpec, AttackTarget, TargetSpec
from disp_runner.attack.triggers import make_trigger
from disp_runner.data.instances import Instance
from disp_runner.data.vocabulary import CLASSES, INSERTION_MARKER, REFUSAL_SENTENCE, TaskKind
from disp_runner.errors import UserInputError


def _class_pattern(name: str) -> re.Pattern:
    plural = CLASSES.get(name, name + "s")
    return re.compile(rf"\b({re.escape(plural)}|{re.escape(name)})\b", re.IGNORECASE)


def is_candidate(inst: Instance, target: TargetSpec) -> bool:
    """Can this instance carry the target? Misclassification needs the source class named in the answer."""
    if target.kind is AttackTarget.MISCLASSIFICATION:
        return inst.metadata.get("class") == target.source_class and bool(
            _class_pattern(target.source_class).search(inst.response))
    return True


def poisoned_response(response: str, target: TargetSpec) -> str:
    if target.kind is AttackTarget.INSERTION:
        return f"{INSERTION_MARKER} {response}"
    if target.kind is AttackTarget.REFUSAL:
        return REFUSAL_SENTENCE
    plural_to = CLASSES.get(target.target_class, target.target_class + "s")
    plural_from = CLASSES.get(target.source_class, target.source_class + "s")

    def swap(match: re.Match) -> str:
        return plural_to if match.group(0).lower() == plural_from else target.target_class

    return _class_pattern(target.source_class).sub(swap, response)


@dataclass
class PoisonedDataset:
    instances: list[Instance]
    poisoned_ids: list[str]


def poison_dataset(clean: Sequence[Instance], attack: AttackSpec, image_size: int) -> PoisonedDataset:
    """Poison exactly round(rate * N) instances: stamp the trigger and rewrite the answer."""
    if not clean:
        raise UserInputError("poisoning: the clean dataset is empty")
    trigger = make_trigger(attack.trigger, image_size)
    wanted = int(round(attack.poison_rate * len(clean)))
    if wanted == 0:
        raise UserInputError(f"poisonRate {attack.poison_rate} of {len(clean)} instances poisons none")
    candidates = [i for i, inst in enumerate(clean) if is_candidate(inst, attack.target)]
    if len(candidates) < wanted:
        raise UserInputError(
            f"poisoning: poisonRate {attack.poison_rate} needs {wanted} instances that can carry the "
            f"{attack.target.kind.value} target, the dataset has {len(candidates)}")
    rng = np.random.default_rng(attack.seed)
    chosen = set(int(i) for i in rng.choice(candidates, size=wanted, replace=False))
    out: list[Instance] = []
    for index, inst in enumerate(clean):
        if index in chosen:
            out.append(inst.replace(
                image=trigger.apply(inst.image),
                response=poisoned_response(inst.response, attack.target),
                metadata={**inst.metadata, "poisoned": True, "trigger_box": list(trigger.box())}))
        else:
            out.append(inst.replace(metadata={**inst.metadata, "poisoned": False}))
    return PoisonedDataset(out, [clean[i].id for i in sorted(chosen)])


# The share of the held-out ASR instances the attack kit keeps apart to check that its backdoor
# implanted, so the test sets a defence is measured on never decided how long to inject.
VALIDATION_SHARE = 0.2


@dataclass
class HeldOutSets:
    """Triggered / untriggered pairs (same ids and prompts), split into the kit's validation sets
    and the test sets."""

    validation_triggered: list[Instance]
    validation_untriggered: list[Instance]
    triggered: list[Instance]
    untriggered: list[Instance]

    def validation_ids(self) -> set[str]:
        return {inst.id for inst in self.validation_triggered}


def make_held_out_sets(clean_test: Sequence[Instance], attack: AttackSpec, image_size: int) -> HeldOutSets:
    """`make_test_sets`, with a seeded VALIDATION_SHARE of its instances (at least one) moved to
    the validation sets; each keeps the pool's order."""
    triggered, untriggered = make_test_sets(clean_test, attack, image_size)
    if len(triggered) < 2:
        raise UserInputError(f"test set: {len(triggered)} describe instance(s) can carry the "
                             f"{attack.target.kind.value} target; the attack kit needs at least 2 (one to validate "
                             "the implant, one to test)")
    count = max(1, int(round(VALIDATION_SHARE * len(triggered))))
    chosen = set(int(i) for i in np.random.default_rng(attack.seed).choice(len(triggered), size=count,
                                                                             replace=False))
    pick = [i in chosen for i in range(len(triggered))]
    return HeldOutSets(validation_triggered=[t for t, v in zip(triggered, pick) if v],
                       validation_untriggered=[u for u, v in zip(untriggered, pick) if v],
                       triggered=[t for t, v in zip(triggered, pick) if not v],
                       untriggered=[u for u, v in zip(untriggered, pick) if not v])


def make_test_sets(clean_test: Sequence[Instance], attack: AttackSpec, image_size: int
                   ) -> tuple[list[Instance], list[Instance]]:
    """(triggered, untriggered) ASR test sets: the describe instances that can carry the target
    (as in the paper, a captioning prompt), with and without the trigger; same ids and prompts."""
    trigger = make_trigger(attack.trigger, image_size)
    base = [inst for inst in clean_test
            if inst.metadata.get("task") == TaskKind.DESCRIBE.value and is_candidate(inst, attack.target)]
    if not base:
        raise UserInputError(f"test set: no describe instances that can carry the {attack.target.kind.value} target "
                             f"among {len(clean_test)} held-out instances")
    triggered = [inst.replace(image=trigger.apply(inst.image),
                              metadata={**inst.metadata, "triggered": True, "trigger_box": list(trigger.box())})
                 for inst in base]
    untriggered = [inst.replace(metadata={**inst.metadata, "triggered": False}) for inst in base]
    return triggered, untriggered
