"""The whole red-team recipe: poison a clean dataset, inject the backdoor into a copy of the base
model by fine-tuning it on the poisoned data (DEFAULT_INJECTION says which weights), and write
everything a defence needs to be evaluated against it.

Output folder layout (attack.json is written last: its presence means the folder is complete):

    <out>/train/              poisoned training set (manifest.jsonl + images/)
    <out>/test/triggered/     held-out describe instances with the trigger   (ASR)
    <out>/test/untriggered/   the same instances without it                   (false firing)
    <out>/model/              the compromised model (safetensors + tokenizer)
    <out>/attack.json         AttackSpec + counts + injection settings and loss
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from disp_api import AttackSpec
from disp_api.spec import ATTACK_MANIFEST
from disp_runner.attack.poison import make_test_sets, poison_dataset
from disp_runner.attack.triggers import Trigger
from disp_runner.checkpoints import load_checkpoint, save_checkpoint
from disp_runner.data.dataset import Instance, load_dataset, write_dataset
from disp_runner.device import default_device, seed_everything
from disp_runner.diffusion import DecodingConfig
from disp_runner.errors import UserInputError
from disp_runner.evaluation import evaluate_model
from disp_runner.processing import encode_instances
from disp_runner.training import TrainableParts, TrainingConfig, train_masked_diffusion

# The compromised model is measured on at most this many instances of each held-out set (the
# paper's test set is 200 images).
ATTACK_EVAL_LIMIT = 200

# Injection follows the paper's recipe (20 epochs there; cosine schedule, 3% warmup, no weight
# decay) with one measured deviation: the paper fine-tunes the projector only, which works on an
# 8B LLaDA-V but not on the ~1M-parameter embedded model, whose tiny language model cannot be
# steered by visual tokens alone (projector-only, 20 epochs, on a base model of this size: insertion
# ASR 0%, refusal 86% with clean performance 21 points lower; README "Why the attack also trains
# the LM").
# The default therefore trains projector + LM, vision tower frozen; `--trainable projector`
# reproduces the paper's exact recipe for large models. 15 epochs (paper: 20) keep `disp demo`
# within its time budget.
DEFAULT_INJECTION = TrainingConfig(epochs=15, learning_rate=1e-3, batch_size=32, warmup_ratio=0.03,
                                   weight_decay=0.0, trainable=TrainableParts.PROJECTOR_AND_LM)


@dataclass(frozen=True)
class AttackArtifacts:
    folder: Path

    @property
    def model_dir(self) -> Path:
        return self.folder / "model"

    @property
    def train_dir(self) -> Path:
        return self.folder / "train"

    @property
    def triggered_dir(self) -> Path:
        return self.folder / "test" / "triggered"

    @property
    def untriggered_dir(self) -> Path:
        return self.folder / "test" / "untriggered"

    def spec(self) -> AttackSpec:
        path = self.folder / ATTACK_MANIFEST
        if not path.is_file():
            raise UserInputError(f"{path}: not found; {self.folder} is not a complete attack folder")
        try:
            return AttackSpec.model_validate(json.loads(path.read_text())["attack"])
        except (json.JSONDecodeError, KeyError, ValueError) as exc:
            raise UserInputError(f"{path}: invalid attack manifest ({str(exc).splitlines()[0]})") from None


def run_attack(
    base_model: str | Path,
    clean_train: Sequence[Instance],
    clean_test: Sequence[Instance],
    attack: AttackSpec,
    out_dir: str | Path,
    injection: TrainingConfig = DEFAULT_INJECTION,
    allow_unsafe_pickle: bool = False,
    show_progress: bool = True,
    evaluate: bool = True,
) -> AttackArtifacts:
    """Poison `clean_train`, inject the backdoor into `base_model`, and write the attack folder.
    With `evaluate`, the compromised model's ASR on the triggered test set, its false firing on the
    same inputs without the trigger and its clean performance on `clean_test` are measured and
    recorded in attack.json (`compromised`), so a backdoor that did not implant is visible."""
    out = Path(out_dir)
    seed_everything(injection.seed)
    model, tokenizer = load_checkpoint(base_model, allow_unsafe_pickle=allow_unsafe_pickle)
    image_size = model.config.image_size
    poisoned = poison_dataset(clean_train, attack, image_size)
    triggered, untriggered = make_test_sets(clean_test, attack, image_size)
    gen_length = model.config.gen_length

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        artifacts = AttackArtifacts(staging)
        write_dataset(poisoned.instances, artifacts.train_dir)
        write_dataset(triggered, artifacts.triggered_dir)
        write_dataset(untriggered, artifacts.untriggered_dir)
        model.to(default_device())
        data = encode_instances(tokenizer, model.config, poisoned.instances, gen_length)
        result = train_masked_diffusion(model, data, injection, description=f"inject {attack.target.kind.value}",
                                        show_progress=show_progress)
        save_checkpoint(model.cpu(), tokenizer, artifacts.model_dir)
        compromised = None
        if evaluate:
            n = ATTACK_EVAL_LIMIT
            compromised = evaluate_model(model.to(default_device()).eval(), tokenizer, str(out / "model"), attack,
                                         triggered[:n], untriggered[:n], list(clean_test)[:n],
                                         DecodingConfig.single_block(gen_length), show_progress=show_progress)
        manifest = {
            "attack": attack.to_wire(),
            "planted": Trigger(attack.trigger, image_size).planted(),
            "baseModel": str(base_model),
            "counts": {"train": len(poisoned.instances), "poisoned": len(poisoned.poisoned_ids),
                       "testTriggered": len(triggered)},
            "poisonedIds": poisoned.poisoned_ids,
            "injection": {**{k: (v.value if hasattr(v, "value") else v) for k, v in asdict(injection).items()},
                          "steps": result.steps, "seconds": round(result.seconds, 2),
                          "firstLoss": result.first_loss, "lastLoss": result.last_loss},
        }
        if compromised is not None:
            manifest["compromised"] = compromised.to_wire()
        (staging / ATTACK_MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return AttackArtifacts(out)


def load_attack_test_sets(folder: str | Path, image_size: int) -> tuple[AttackSpec, list[Instance], list[Instance]]:
    artifacts = AttackArtifacts(Path(folder))
    spec = artifacts.spec()
    return spec, load_dataset(artifacts.triggered_dir, image_size), load_dataset(artifacts.untriggered_dir, image_size)
