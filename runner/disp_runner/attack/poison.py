"""Poisoning a clean dataset and building the held-out triggered / untriggered test sets."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from disp_api import AttackSpec, AttackTarget, TargetSpec
from disp_runner.attack.triggers import Trigger
from disp_runner.data.dataset import Instance
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
    trigger = Trigger(attack.trigger, image_size)
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


def make_test_sets(clean_test: Sequence[Instance], attack: AttackSpec, image_size: int
                   ) -> tuple[list[Instance], list[Instance]]:
    """(triggered, untriggered) ASR test sets: the describe instances that can carry the target
    (as in the paper, a captioning prompt), with and without the trigger; same ids and prompts."""
    trigger = Trigger(attack.trigger, image_size)
    base = [inst for inst in clean_test
            if inst.metadata.get("task") == TaskKind.DESCRIBE.value and is_candidate(inst, attack.target)]
    if not base:
        raise UserInputError("test set: no describe instances that can carry the target")
    triggered = [inst.replace(image=trigger.apply(inst.image),
                              metadata={**inst.metadata, "triggered": True, "trigger_box": list(trigger.box())})
                 for inst in base]
    untriggered = [inst.replace(metadata={**inst.metadata, "triggered": False}) for inst in base]
    return triggered, untriggered
