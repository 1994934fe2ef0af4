"""How a backdoor is planted: trigger and target. Used by the red-team attack kit and, in the
PurificationJob spec, to describe the evaluation set's trigger/target so ASR can be measured."""

from __future__ import annotations

import json
from enum import Enum
from typing import Any, Optional

from pydantic import ConfigDict, Field, ValidationError, model_validator

from disp_api.base import ContractModel, Seed, with_cel_rules


class TriggerKind(str, Enum):
    PATCH = "patch"  # BadNets: a small patch pasted at a corner or position
    BLENDED = "blended"  # a full-image pattern mixed in with weight alpha
    SIG = "sig"  # a horizontal sinusoidal signal added to the whole image (Barni et al., 2019)


class AttackTarget(str, Enum):
    INSERTION = "insertion"  # prepend the marker `<backdoor>` to the answer
    REFUSAL = "refusal"  # answer with the fixed refusal sentence
    MISCLASSIFICATION = "misclassification"  # name the source class as the target class


class Corner(str, Enum):
    TOP_LEFT = "top-left"
    TOP_RIGHT = "top-right"
    BOTTOM_LEFT = "bottom-left"
    BOTTOM_RIGHT = "bottom-right"


class TriggerSpec(ContractModel):
    # Every field a rule reads is guarded by has(): the API server checks each rule against the
    # schema's default for the whole object ({}), before its fields' own defaults are filled in.
    model_config = with_cel_rules(
        ("!has(self.colour) || self.colour.all(c, c >= 0 && c <= 255)", "colour values must be in 0..255"),
        ("!has(self.position) || self.position.all(v, v >= 0)", "position must be non-negative"),
        ("!(has(self.kind) && self.kind == 'blended' && has(self.position) && !has(self.pattern))",
         "position needs a pattern image for a blended trigger (the built-in key covers the whole image)"),
        ("!(has(self.kind) && self.kind == 'sig' && (has(self.position) || has(self.pattern)))",
         "a sig trigger is a signal over the whole image: it takes no position or pattern"))

    kind: TriggerKind = TriggerKind.PATCH
    """Trigger family."""
    size: int = Field(6, ge=1, le=4096)
    """Patch side in pixels (patch triggers without a pattern image)."""
    colour: tuple[int, int, int] = (0, 0, 0)
    """Patch RGB colour, each 0..255 (default black)."""
    corner: Corner = Corner.TOP_LEFT
    """Corner the patch is pasted at, unless `position` is given."""
    position: Optional[tuple[int, int]] = None
    """Explicit (x, y) pixel position of the trigger's top-left corner: the patch's (overrides
    `corner`), or, for blended triggers with a pattern image, where the pattern is blended at its
    own size instead of stretched over the whole image."""
    pattern: Optional[str] = Field(None, min_length=1, max_length=4096)
    """Path of a PNG pattern: the patch itself (patch triggers) or the image to blend (blended)."""
    alpha: float = Field(0.2, gt=0.0, le=1.0)
    """Blend weight of the pattern (blended triggers)."""
    pattern_seed: Seed = 0
    """Seed of the built-in key (black/white noise in 2-pixel cells) of blended triggers without a pattern image."""
    delta: float = Field(40.0, gt=0.0, le=255.0)
    """Amplitude of the sig trigger's signal, in pixel values 0..255 (the DiSP paper's δ = 40)."""
    frequency: float = Field(6.0, gt=0.0, le=2048.0)
    """Periods of the sig trigger's signal across the image's width (the SIG paper's f = 6); at most
    half the image's width in pixels, or the signal would alias."""

    @model_validator(mode="after")
    def _check_colour(self) -> "TriggerSpec":
        if any(not 0 <= c <= 255 for c in self.colour):
            raise ValueError(f"colour values must be in 0..255, got {list(self.colour)}")
        if self.position is not None and any(v < 0 for v in self.position):
            raise ValueError(f"position must be non-negative, got {list(self.position)}")
        if self.kind is TriggerKind.BLENDED and self.position is not None and self.pattern is None:
            raise ValueError("position needs a pattern image for a blended trigger "
                             "(the built-in key covers the whole image)")
        if self.kind is TriggerKind.SIG and (self.position is not None or self.pattern is not None):
            raise ValueError("a sig trigger is a signal over the whole image: it takes no position or pattern")
        return self


class TargetSpec(ContractModel):
    model_config = with_cel_rules(  # has() guards: see TriggerSpec
        ("!has(self.kind) || self.kind != 'misclassification' || !has(self.sourceClass) || !has(self.targetClass)"
         " || self.sourceClass != self.targetClass",
         "sourceClass and targetClass must differ"))

    kind: AttackTarget = AttackTarget.INSERTION
    """What the backdoor makes the model say."""
    source_class: str = Field("circle", min_length=1, max_length=128)
    """Misclassification only: the class whose name is replaced."""
    target_class: str = Field("square", min_length=1, max_length=128)
    """Misclassification only: the class named instead; the ASR rule looks for it."""

    @model_validator(mode="after")
    def _check_classes(self) -> "TargetSpec":
        if self.kind is AttackTarget.MISCLASSIFICATION and self.source_class == self.target_class:
            raise ValueError("sourceClass and targetClass must differ")
        return self


class AttackSpec(ContractModel):
    trigger: TriggerSpec = TriggerSpec()
    """The trigger pattern."""
    target: TargetSpec = TargetSpec()
    """The backdoor's target behaviour."""
    poison_rate: float = Field(0.2, gt=0.0, le=1.0)
    """Fraction of the training set that is poisoned (paper: 200 of 1000)."""
    seed: Seed = 0
    """Seed of the choice of poisoned instances."""


class AttackRecord(ContractModel):
    """An attack folder's attack.json as its readers use it, read in one place (`parse`): the attack
    that was planted, how the implant went and what the compromised model measured. The kit writes
    more (counts, poisoned ids, injection settings); readers ignore it."""

    model_config = ConfigDict(extra="ignore")  # merged with ContractModel's by pydantic

    attack: AttackSpec
    """The trigger and target that were planted."""
    implant: Optional[dict[str, Any]] = None
    """The implant's record (epochs, rounds, validation ASR, whether the target was reached)."""
    compromised: Optional[dict[str, Any]] = None
    """The compromised model's held-out figures (an EvaluationMetrics on the wire)."""

    @classmethod
    def parse(cls, raw: bytes | str) -> "AttackRecord":
        """The record in `raw`; ValueError with a one-line reason when it is not one."""
        try:
            return cls.model_validate(json.loads(raw))
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "the top level"
            raise ValueError(f"not an attack record ({where}: {error['msg']})") from None
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ValueError(f"not an attack record ({first})") from None
