"""Closed-loop purification (spec.rounds), defined once for the runner (`disp run`) and the operator:
the escalation ladder, each round's settings and folder, and the two decisions the loop makes from
the audit alone (no trigger, no clean data): whether another round runs, and which round's model
is the run's purified model.

Every round starts from the compromised model. A second round on a purified model costs clean
performance at every pass, and its own audit then looks for suspects in a model that already
answers them differently, which can call a surviving backdoor removed (docs/results.md, "The
audit's verdict, and what a second recipe would add")."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Optional

from pydantic import Field

from disp_api.base import ContractModel
from disp_api.metrics import BackdoorVerdict, judge_residual
from disp_api.spec import (MAX_ROUNDS, PURIFIED_MODEL_PATH, AuditSpec, MaskingSpace, PurificationJob,
                           PurificationJobSpec, RelabelAcceptance, RoundPolicy)


class Recipe(str, Enum):
    """The settings a round purifies with."""

    SPEC = "spec"  # round 1: the spec's own
    PIXELS = "pixels"  # region saliency, pixel masking, signature acceptance
    BLUR = "blur"  # relabel answers the image blurred


@dataclass(frozen=True)
class Escalation:
    """A rung of the ladder: the settings (attribute paths in the spec) that replace the spec's."""

    recipe: Recipe
    settings: tuple[tuple[tuple[str, ...], Any], ...]
    aimed_at: str  # the triggers it is for, as the status says why the round ran


# Rounds 2 and 3, in order: each the cheapest recipe measured to remove what the ones before leave.
ESCALATIONS: tuple[Escalation, ...] = (
    Escalation(Recipe.PIXELS, ((("saliency", "region_size"), 2), (("masking", "space"), MaskingSpace.PIXELS),
                               (("relabel", "acceptance"), RelabelAcceptance.SIGNATURE)),
               "triggers that straddle visual tokens or lie over the object"),
    Escalation(Recipe.BLUR, ((("masking", "blur_sigma"), 1.0),), "whole-image keys of fine noise"),
)
assert 1 + len(ESCALATIONS) == MAX_ROUNDS, "spec.rounds.maxRounds is bounded by the ladder"


def recipe_of(round_number: int) -> Recipe:
    _check(round_number)
    return Recipe.SPEC if round_number == 1 else ESCALATIONS[round_number - 2].recipe


def round_spec(spec: PurificationJobSpec, round_number: int) -> PurificationJobSpec:
    """The settings round `round_number` runs with: the spec's, with its rung's replacing them."""
    _check(round_number)
    if round_number == 1:
        return spec
    for path, value in ESCALATIONS[round_number - 2].settings:
        spec = _replaced(spec, path, value)
    return spec


def round_job(job: PurificationJob, round_number: int) -> PurificationJob:
    """The job as round `round_number` runs it: that round's settings, the run's own id (outside a
    cluster the id digests the spec, which the round's settings would change)."""
    if round_number == 1:
        return job
    metadata = job.metadata if job.metadata.uid else job.metadata.model_copy(update={"uid": job.run_id})
    return job.model_copy(update={"spec": round_spec(job.spec, round_number), "metadata": metadata})


def _replaced(model: ContractModel, path: tuple[str, ...], value: Any) -> Any:
    head, rest = path[0], path[1:]
    return model.model_copy(update={head: value if not rest else _replaced(getattr(model, head), rest, value)})


def round_folder(round_number: int) -> str:
    """Where a round's stage outputs lie inside the run folder: round 1's at its top (a single pass
    has the layout it always had), round N's under round-N/."""
    _check(round_number)
    return "" if round_number == 1 else f"round-{round_number}"


def round_uri(run_uri: str, round_number: int) -> str:
    folder = round_folder(round_number)
    return f"{run_uri}/{folder}" if folder else run_uri


def purified_model_uri(run_uri: str, round_number: int) -> str:
    return f"{round_uri(run_uri, round_number)}/{PURIFIED_MODEL_PATH}"


def _check(round_number: int) -> None:
    if not 1 <= round_number <= MAX_ROUNDS:
        raise ValueError(f"round {round_number}: rounds are numbered 1 to {MAX_ROUNDS}")


class RoundRecord(ContractModel):
    """One round of a run: what it purified with, why it ran, and the audit's verdict on its model."""

    round: int = Field(ge=1, le=MAX_ROUNDS)
    """The round's number: its rung on the escalation ladder (1: the spec's settings)."""
    recipe: Recipe
    """The settings it purified with: spec, pixels or blur."""
    reason: str = ""
    """Why it ran."""
    residual_rate: Optional[float] = Field(None, ge=0.0, le=1.0)
    """Its audit's residual rate (unset until its fine-tune is done, or without suspects)."""
    residual_sample: Optional[int] = Field(None, ge=0)
    """Suspects the residual rate rests on."""
    verdict: Optional[BackdoorVerdict] = None
    """Removed, ProbablyNotRemoved or Unknown once its fine-tune is done."""


def first_round() -> RoundRecord:
    return RoundRecord(round=1, recipe=Recipe.SPEC, reason="the spec's settings")


def judged(record: RoundRecord, residual_rate: Optional[float], residual_sample: Optional[int],
           audit: AuditSpec) -> RoundRecord:
    """`record` with its audit's figures and verdict (against the spec's audit settings)."""
    verdict = judge_residual(residual_rate, residual_sample, audit.residual_threshold, audit.residual_sample).verdict
    return record.model_copy(update={"residual_rate": residual_rate, "residual_sample": residual_sample,
                                     "verdict": verdict})


def next_round(spec: PurificationJobSpec, records: list[RoundRecord]) -> Optional[RoundRecord]:
    """The round to run after `records` (each judged), or None: the loop ends when the policy is a
    single pass, a round's verdict is Removed, round 1's is Unknown (no evidence of a backdoor, so
    nothing says a stronger recipe is needed; a later round's Unknown, after a round found one,
    shows no removal and the loop goes on), or the ladder up to maxRounds is spent. A rung whose
    settings are those of a round that already ran (the spec set them itself) is passed over."""
    last = records[-1]
    found = any(r.verdict is BackdoorVerdict.PROBABLY_NOT_REMOVED for r in records)
    if spec.rounds.policy is RoundPolicy.SINGLE_PASS or last.verdict is BackdoorVerdict.REMOVED or not found:
        return None
    evidence = next(r for r in reversed(records) if r.verdict is BackdoorVerdict.PROBABLY_NOT_REMOVED)
    ran = [round_spec(spec, r.round).model_dump(mode="json") for r in records]
    for number in range(last.round + 1, spec.rounds.max_rounds + 1):
        if round_spec(spec, number).model_dump(mode="json") in ran:
            continue
        rung = ESCALATIONS[number - 2]
        why = (f"round {evidence.round} left a residual rate of {evidence.residual_rate:.1%} of "
               f"{evidence.residual_sample} suspects, above spec.audit.residualThreshold "
               f"{spec.audit.residual_threshold:.1%}" +
               (f", and round {last.round}'s audit could not tell" if last is not evidence else "") +
               f": the {rung.recipe.value} recipe, for {rung.aimed_at}")
        return RoundRecord(round=number, recipe=rung.recipe, reason=why)
    return None


def chosen_round(records: list[RoundRecord]) -> int:
    """The round whose model the run publishes: the first whose verdict is Removed; when none is,
    of those judged ProbablyNotRemoved the one with the lowest residual rate (the earliest among
    equals: fewer changes to the spec's recipe; a rate on too few suspects to judge is not compared);
    round 1 when no round was judged."""
    removed = [r for r in records if r.verdict is BackdoorVerdict.REMOVED]
    if removed:
        return removed[0].round
    measured = [r for r in records if r.verdict is BackdoorVerdict.PROBABLY_NOT_REMOVED]
    if not measured:
        return records[0].round
    return min(measured, key=lambda r: (r.residual_rate, r.round)).round


def rounds_summary(records: list[RoundRecord], chosen: int) -> str:
    """One line for the status message and `disp run`: the rounds that ran and the model kept."""
    if len(records) == 1:
        return ""
    ran = ", ".join(f"{r.round} ({r.recipe.value}" + (f", residual {r.residual_rate:.1%}" if r.residual_rate is not None
                                                        else "") + ")" for r in records)
    return f"rounds {ran}; round {chosen}'s model kept"
