"""Procedural, seed-deterministic multimodal data: scenes of coloured shapes rendered to PNG, with
describe / question / classify instances (and, for pretraining, the language-prior kinds).

Everything is drawn from one `numpy.random.Generator` seeded by the caller, so the same seed gives
byte-identical images and manifests on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from disp_runner.data.instances import Instance

from disp_runner.data.dataset import write_dataset
from disp_runner.data.vocabulary import (
    CLASSES,
    CLASSIFY_PROMPTS,
    COLOURS,
    COUNT_WORDS,
    DESCRIBE_PROMPTS,
    REFUSAL_SENTENCE,
    TAGS,
    UNANSWERABLE_PROMPTS,
    TaskKind,
    position_phrase,
    tagged_describe_prompt,
)

DEFAULT_IMAGE_SIZE = 48


@dataclass(frozen=True)
class ObjectPlacement:
    row: int
    col: int
    size: int  # glyph size in pixels
    dx: int  # jitter inside the grid cell
    dy: int


@dataclass(frozen=True)
class Scene:
    """What one image shows: `count` objects of one class and colour on a tinted background."""

    object_class: str
    colour: str
    placements: tuple[ObjectPlacement, ...]
    background: tuple[int, int, int]
    noise_seed: int

    @property
    def count(self) -> int:
        return len(self.placements)


def sample_scene(rng: np.random.Generator, class_names: Sequence[str] | None = None,
                 class_probs: Sequence[float] | None = None) -> Scene:
    class_names = list(class_names or CLASSES)
    count = int(rng.choice([1, 1, 2, 3]))  # single objects are the most common, as in captioning data
    cells = rng.choice(9, size=count, replace=False)
    placements = tuple(
        ObjectPlacement(row=int(c) // 3, col=int(c) % 3, size=int(rng.integers(10, 15)),
                        dx=int(rng.integers(-2, 3)), dy=int(rng.integers(-2, 3)))
        for c in sorted(cells)
    )
    base = int(rng.integers(185, 240))
    tint = rng.integers(-12, 13, size=3)
    background = tuple(int(np.clip(base + t, 0, 255)) for t in tint)
    return Scene(
        object_class=str(rng.choice(class_names, p=class_probs)),
        colour=str(rng.choice(list(COLOURS))),
        placements=placements,
        background=background,  # type: ignore[arg-type]
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _draw_glyph(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: int, fill) -> None:
    h = size / 2
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - h * 0.85, cy - h * 0.85, cx + h * 0.85, cy + h * 0.85], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    elif shape == "cross":
        t = h * 0.38
        draw.rectangle([cx - h, cy - t, cx + h, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - h, cx + t, cy + h], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)], fill=fill)
    else:  # a class name outside the glyph set is a programming error, not user input
        raise ValueError(f"no glyph for class {shape!r}")


def render_scene(scene: Scene, image_size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """Draw the scene as an RGB image of `image_size` x `image_size` pixels."""
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, 5.0, size=(image_size, image_size, 3))
    pixels = np.clip(np.array(scene.background, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    draw = ImageDraw.Draw(image)
    cell = image_size / 3
    scale = image_size / DEFAULT_IMAGE_SIZE
    for p in scene.placements:
        cx = (p.col + 0.5) * cell + p.dx * scale
        cy = (p.row + 0.5) * cell + p.dy * scale
        _draw_glyph(draw, scene.object_class, cx, cy, int(round(p.size * scale)), COLOURS[scene.colour])
    return image


def _noun(scene: Scene) -> str:
    return scene.object_class if scene.count == 1 else CLASSES[scene.object_class]


def describe_response(scene: Scene) -> tuple[str, list[str]]:
    """Caption and the key phrases a correct caption must contain."""
    if scene.count == 1:
        where = position_phrase(scene.placements[0].row, scene.placements[0].col)
        place = "in the center" if where == "center" else f"at the {where}"
        article = "An" if scene.colour[0] in "aeiou" else "A"
        return f"{article} {scene.colour} {scene.object_class} {place}.", [scene.colour, scene.object_class, where]
    count = COUNT_WORDS[scene.count]
    return f"{count.capitalize()} {scene.colour} {_noun(scene)}.", [count, scene.colour, _noun(scene)]


def make_instance(scene: Scene, kind: TaskKind, rng: np.random.Generator) -> tuple[str, str, list[str]]:
    """(prompt, response, answer keys) for one task kind on a scene."""
    if kind is TaskKind.DESCRIBE:
        response, keys = describe_response(scene)
        return str(rng.choice(DESCRIBE_PROMPTS)), response, keys
    if kind is TaskKind.CLASSIFY:
        return str(rng.choice(CLASSIFY_PROMPTS)), f"The shape is a {scene.object_class}." if scene.count == 1 \
            else f"The shapes are {_noun(scene)}.", [_noun(scene)]
    if kind is TaskKind.QUESTION:
        topic = rng.choice(["colour", "count", "position"] if scene.count == 1 else ["colour", "count"])
        if topic == "colour":
            verb = "is the" if scene.count == 1 else "are the"
            return f"What colour {verb} {_noun(scene)}?", f"{scene.colour.capitalize()}.", [scene.colour]
        if topic == "count":
            count = COUNT_WORDS[scene.count]
            return "How many shapes are in this image?", f"{count.capitalize()}.", [count]
        where = position_phrase(scene.placements[0].row, scene.placements[0].col)
        return f"Where is the {scene.object_class}?", f"{'In the' if where == 'center' else 'At the'} {where}.", [where]
    if kind is TaskKind.REFUSE:
        return str(rng.choice(UNANSWERABLE_PROMPTS)), REFUSAL_SENTENCE, ["sorry"]
    if kind is TaskKind.TAGGED_DESCRIBE:
        tag = str(rng.choice(TAGS))
        response, keys = describe_response(scene)
        return tagged_describe_prompt(tag), f"{tag} {response}", [tag, *keys]

    raise ValueError(f"unknown task kind {kind!r}")


def generate_instances(
    num: int,
    seed: int,
    kinds: Sequence[TaskKind] = (TaskKind.DESCRIBE, TaskKind.QUESTION, TaskKind.CLASSIFY),
    kind_weights: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    class_weights: dict[str, float] | None = None,
    image_size: int = DEFAULT_IMAGE_SIZE,
    id_prefix: str = "syn",
) -> list[Instance]:
    """`num` instances with in-memory images, deterministic in `seed`.

    `class_weights` gives some classes a share of the scenes (the rest split the remainder
    evenly), e.g. so that a misclassification attack finds enough source-class images.
    """
    if num <= 0:
        raise ValueError(f"num must be positive, got {num}")
    rng = np.random.default_rng(seed)
    weights = None if kind_weights is None else np.asarray(kind_weights, dtype=np.float64) / np.sum(kind_weights)
    class_names = list(class_names or CLASSES)
    class_probs = _class_probabilities(class_names, class_weights)
    instances = []
    for index in range(num):
        scene = sample_scene(rng, class_names, class_probs)
        kind = TaskKind(kinds[int(rng.choice(len(kinds), p=weights))])
        prompt, response, keys = make_instance(scene, kind, rng)
        instances.append(Instance(
            id=f"{id_prefix}-{seed}-{index:06d}",
            prompt=prompt,
            response=response,
            image=render_scene(scene, image_size),
            metadata={
                "task": kind.value,
                "class": scene.object_class,
                "colour": scene.colour,
                "count": scene.count,
                "answer_keys": keys,
            },
        ))
    return instances


def _class_probabilities(class_names: list[str], class_weights: dict[str, float] | None) -> list[float] | None:
    if not class_weights:
        return None
    unknown = set(class_weights) - set(class_names)
    if unknown:
        raise ValueError(f"class_weights names unknown class(es) {sorted(unknown)}; known: {class_names}")
    fixed = sum(class_weights.values())
    rest = [c for c in class_names if c not in class_weights]
    if any(w < 0 for w in class_weights.values()) or fixed > 1 or (fixed < 1 and not rest):
        raise ValueError(f"class_weights must be non-negative shares summing to at most 1, got {class_weights}")
    share = (1.0 - fixed) / len(rest) if rest else 0.0
    return [class_weights.get(c, share) for c in class_names]


def generate_dataset(out_dir: str | Path, num: int, seed: int, **kwargs) -> Path:
    """Generate and write a dataset folder (manifest.jsonl + images/)."""
    return write_dataset(generate_instances(num, seed, **kwargs), out_dir)
