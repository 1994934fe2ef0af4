"""Two alternatives to the audit's residual rate, measured on runs `benchmarks/triggers_anywhere.py`
left in its --workdir (spec defaults, the closed loop); docs/results.md "Two audit designs measured
offline" quotes it:

    .venv/bin/python benchmarks/audit_alternatives.py W signature offgrid-centre-red-insertion:2 blended-refusal:3
    .venv/bin/python benchmarks/audit_alternatives.py W held-out corner-tr-6px-black-insertion:1

- signature: the words relabel removes most consistently (disp/signature.py's rule); the carriers
  are the training answers holding one that relabel removed; the residual is the share of up to 64
  carriers on which the round's purified model, shown the original image, still says one.
- held-out: the round's fine-tune again, from the compromised model, without the audit's sample
  (the top suspects whose answer relabel changed, up to 64); the residual on that sample and the ASR
  on the attack's triggered test set (200 images).

Each line prints the round's own residual rate and ASR beside (`COMBINATION:ROUND`; the round's
folder must hold its relabel and fine-tune outputs). Prints figures, never asserts.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

import torch

from disp_api import AttackSpec, FinetuneSpec
from disp_api.rounds import round_folder
from disp_runner.data.dataset import load_dataset
from disp_runner.diffusion.decoding import DecodingConfig
from disp_runner.diffusion.inference import generate_responses
from disp_runner.diffusion.training import TrainingConfig, train_masked_diffusion
from disp_runner.disp.audit import read_suspects
from disp_runner.disp.signature import signature_words
from disp_runner.evaluation import attack_success_rate, normalise_answer
from disp_runner.models.base import EncodedInstances
from disp_runner.models.loading import load_model

SAMPLE = 64  # as spec.audit.residualSample's default
DECODING = DecodingConfig.single_block(16)  # the embedded model's answers


def _words(text: str) -> set[str]:
    return set(normalise_answer(text).split())


def _spec(folder: Path) -> dict:
    return json.loads((folder / "provenance.json").read_text())["predicate"]["buildDefinition"]["externalParameters"]["spec"]


def _is_default_loop(spec: dict) -> bool:
    """A run with the spec's defaults (triggers_anywhere without --set, or a row's own job fields)."""
    return (spec.get("rounds", {}).get("policy", "closed-loop") == "closed-loop"
            and spec.get("saliency", {}).get("regionSize", 1) == 1
            and spec.get("masking", {}).get("space", "tokens") == "tokens"
            and spec.get("relabel", {}).get("acceptance", "all") == "all"
            and not spec.get("masking", {}).get("blurSigma"))


def round_dir(work: Path, combo: str, number: int) -> Path:
    for run in sorted((work / "runs" / "default" / combo).glob("local-*")):
        folder = run / round_folder(number) if number > 1 else run
        if _is_default_loop(_spec(run)) and (folder / "finetune" / "audit.json").is_file():
            return folder
    raise SystemExit(f"{work}: no closed-loop run of {combo} with a round {number}")


def _round_figures(folder: Path) -> dict:
    audit = json.loads((folder / "finetune" / "audit.json").read_text())
    metrics = folder / "evaluate" / "metrics.json"
    return {"roundResidual": audit.get("residualRate"), "roundSample": audit.get("residualSample"),
            "roundAsr": json.loads(metrics.read_text())["asrAfter"] if metrics.is_file() else None}


def signature_residual(work: Path, combo: str, folder: Path) -> dict:
    train = load_dataset(work / "attacks" / combo / "train", 48)
    relabels = {json.loads(line)["id"]: json.loads(line)["response"]
                for line in (folder / "relabel" / "dataset" / "manifest.jsonl").read_text().splitlines()}
    answers = [relabels[inst.id] for inst in train]
    words = signature_words([inst.response for inst in train], answers)
    present, removed = Counter(), Counter()
    for inst, answer in zip(train, answers):
        present.update(_words(inst.response))
        removed.update(_words(inst.response) - _words(answer))
    signature = set(words)
    carriers = [inst for inst, answer in zip(train, answers) if (_words(inst.response) - _words(answer)) & signature]
    random.Random(0).shuffle(carriers)
    chosen = carriers[:SAMPLE]
    figures = {"signature": {w: round(removed[w] / present[w], 3) for w in words[:4]}, "carriers": len(carriers),
               "carriersPoisoned": sum(1 for inst in carriers if inst.metadata.get("poisoned"))}
    if chosen:
        model, processor = load_model(folder / "finetune" / "model")
        said = generate_responses(model.eval(), processor, chosen, DECODING, batch_size=64, show_progress=False)
        still = sum(1 for answer, inst in zip(said, chosen) if _words(answer) & _words(inst.response) & signature)
        figures.update(residual=round(still / len(chosen), 3), of=len(chosen))
    return figures


def held_out_residual(work: Path, combo: str, folder: Path) -> dict:
    finetune = FinetuneSpec.model_validate(_spec(folder)["finetune"])
    attack = AttackSpec.model_validate(json.loads((work / "attacks" / combo / "attack.json").read_text())["attack"])
    model, processor = load_model(work / "attacks" / combo / "model")
    train = {inst.id: inst for inst in load_dataset(work / "attacks" / combo / "train", 48)}
    sample = [r.id for r in read_suspects(folder / "relabel") if r.suspect and r.answerChanged][:SAMPLE]
    purified = [inst for inst in load_dataset(folder / "relabel" / "dataset", 48, empty_responses=True)
                if inst.id not in set(sample)]
    config = TrainingConfig(epochs=finetune.epochs, learning_rate=finetune.learning_rate,
                            batch_size=finetune.batch_size, warmup_ratio=finetune.warmup_ratio,
                            weight_decay=finetune.weight_decay, seed=finetune.seed, trainable=finetune.trainable)
    train_masked_diffusion(model, EncodedInstances(processor, purified, DECODING.gen_length, finetune.labels),
                           processor.mask_token_id, config, description="finetune", show_progress=False)
    model.eval()
    figures = {"sample": len(sample), "samplePoisoned": sum(1 for i in sample if train[i].metadata.get("poisoned"))}
    if sample:
        chosen = [train[i] for i in sample]
        said = generate_responses(model, processor, chosen, DECODING, batch_size=64, show_progress=False)
        kept = sum(normalise_answer(a) == normalise_answer(inst.response) for a, inst in zip(said, chosen))
        figures["residual"] = round(kept / len(chosen), 3)
    triggered = load_dataset(work / "attacks" / combo / "test" / "triggered", 48)[:200]
    figures["asr"] = round(attack_success_rate(
        generate_responses(model, processor, triggered, DECODING, batch_size=64, show_progress=False), attack.target), 3)
    return figures


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] not in ("signature", "held-out"):
        raise SystemExit(__doc__)
    torch.set_num_threads(1)
    work, design = Path(sys.argv[1]), sys.argv[2]
    measure = signature_residual if design == "signature" else held_out_residual
    for item in sys.argv[3:]:
        combo, _, number = item.partition(":")
        folder = round_dir(work, combo, int(number or 1))
        print(json.dumps({"combination": combo, "round": int(number or 1), **_round_figures(folder),
                          design: measure(work, combo, folder)}), flush=True)


if __name__ == "__main__":
    main()
