"""The model protocol holds: a second, deliberately different family, written only here, runs every
DiSP stage through the registry, and nothing outside a family's folder imports the family.

The toy family differs from the embedded one wherever the protocol lets families differ: its own
special-token names; a text prefix and start/end markers around the image, so the visual tokens
never start at the sequence's first real position; images of any size in steps of 4 pixels, one
visual token per 4x4 cell plus a separator token that ends every row and sees no cell (as
LLaDA-V's image_newline), so images of different sizes have different numbers of visual tokens
(20 for 16x16, 15 for 16x12; the embedded tiny model has 4); learned positions instead of rotary
ones; and it places its visual tokens by the visual spans the processor records (not by scanning
for placeholders), so a span the generic code got wrong fails loudly.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

import disp_runner
from disp_api import PurificationJob, PurificationMetrics, StageName
from disp_runner.cli import main
from disp_runner.data.dataset import load_dataset, write_dataset
from disp_runner.errors import UserInputError
from disp_runner.models import registry
from disp_runner.models.base import ModelFamily, ModelPart, Processor, TokenGrid, VisualLayout
from disp_runner.models.loading import load_model, save_model
from disp_runner.pipeline.artifacts import RunLayout
from disp_runner.stages.saliency import read_scores
from tests.tiny import job_document

TOY_TYPE = "toy_prefix_vlm"
TOY_SPECIALS = ("<pad>", "<unk>", "<|mask|>", "<|eot|>", "<img>", "<vision_start>", "<vision_end>")
PREFIX_WORDS = "look at this picture"
CELL = 4  # pixels per visual token side
MAX_SIDE = 16  # the largest image the toy takes


class ToyConfig(PretrainedConfig):
    model_type = TOY_TYPE

    def __init__(self, vocab_size=64, hidden_size=32, image_size=16, max_positions=128, mask_token_id=2,
                 image_token_id=4, vision_start_id=5, vision_end_id=6, gen_length=16, **kwargs):
        self.vocab_size, self.hidden_size, self.image_size = vocab_size, hidden_size, image_size
        self.max_positions, self.mask_token_id, self.gen_length = max_positions, mask_token_id, gen_length
        self.image_token_id, self.vision_start_id, self.vision_end_id = image_token_id, vision_start_id, vision_end_id
        super().__init__(**kwargs)


class ToyVLM(PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = "toy"

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        d = config.hidden_size
        self.patchify = nn.Conv2d(3, 16, CELL, stride=CELL)
        self.projector = nn.Sequential(nn.Linear(16, d), nn.GELU(), nn.Linear(d, d))
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.positions = nn.Embedding(config.max_positions, d)
        self.encoder = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True)
        self.lm_head = nn.Linear(d, config.vocab_size)
        self.separator = nn.Parameter(torch.zeros(d))  # ends every row of visual tokens
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.05)

    def embed_images(self, pixel_values, image_sizes):
        """Each image's rows of cells, each row followed by the separator; zeros after a short row."""
        cells = self.projector(self.patchify(pixel_values).permute(0, 2, 3, 1))  # [B, 4, 4, D] of the padded canvas
        rows = []
        for grid, (height, width) in zip(cells, image_sizes.tolist()):
            used = grid[:height // CELL, :width // CELL]  # [h, w, D]
            separators = self.separator.expand(used.shape[0], 1, -1)
            rows.append(torch.cat([used, separators], dim=1).reshape(-1, used.shape[-1]))
        return nn.utils.rnn.pad_sequence(rows, batch_first=True)

    def mask_embedding(self):
        return self.embed_tokens.weight[self.config.mask_token_id]

    def forward(self, input_ids, attention_mask, visual_spans, image_embeds=None, pixel_values=None,
                image_sizes=None, image_token_mask=None, logits_at=None, **_):
        if image_embeds is None:
            image_embeds = self.embed_images(pixel_values, image_sizes)
        if image_token_mask is not None:
            image_embeds = torch.where(image_token_mask[..., None], self.mask_embedding(), image_embeds)
        rows = []
        for ids, embeds, visual, (start, length) in zip(input_ids, self.embed_tokens(input_ids), image_embeds,
                                                         visual_spans.tolist()):
            if not bool((ids[start:start + length] == self.config.image_token_id).all()):
                raise ValueError(f"visual span ({start}, {length}) does not cover the <img> placeholders")
            rows.append(torch.cat([embeds[:start], visual[:length].to(embeds.dtype), embeds[start + length:]]))
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.encoder(torch.stack(rows) + self.positions(positions),
                              src_key_padding_mask=~attention_mask.bool())
        return self.lm_head(hidden if logits_at is None else hidden[:, logits_at])

    def parameter_parts(self):  # the separator is the language model's, as LLaDA-V's image_newline
        vision, projector = list(self.patchify.parameters()), list(self.projector.parameters())
        taken = {id(p) for p in vision + projector}
        return {ModelPart.VISION: vision, ModelPart.PROJECTOR: projector,
                ModelPart.LANGUAGE: [p for p in self.parameters() if id(p) not in taken]}


class ToyProcessor(Processor):
    @property
    def image_size(self):
        return None  # any size up to MAX_SIDE in steps of CELL

    def visual_layout(self, width, height):
        if width % CELL or height % CELL or not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            raise UserInputError(f"the toy takes images up to {MAX_SIDE}x{MAX_SIDE} in steps of {CELL} pixels, "
                                 f"not {width}x{height}")
        rows, cols = height // CELL, width // CELL
        return VisualLayout(rows * (cols + 1), (TokenGrid(rows, cols, CELL, CELL, row_stride=cols + 1),))

    def visual_prefix(self, layout):
        words = self.tokenizer(PREFIX_WORDS, add_special_tokens=False)["input_ids"]
        visual = [self.config.image_token_id] * layout.num_tokens
        return words + [self.config.vision_start_id] + visual + [self.config.vision_end_id], len(words) + 1

    def pixel_values(self, instances):
        """Every image at the top left of a MAX_SIDE canvas."""
        canvas = torch.zeros(len(instances), 3, MAX_SIDE, MAX_SIDE)
        for row, inst in enumerate(instances):
            pixels = torch.from_numpy(np.asarray(inst.image.convert("RGB"), dtype=np.float32) / 255.0)
            canvas[row, :, :pixels.shape[0], :pixels.shape[1]] = pixels.permute(2, 0, 1)
        return canvas

    @property
    def max_positions(self):
        return self.config.max_positions

    @property
    def reserved_ids(self):
        c = self.config
        return frozenset({c.image_token_id, c.vision_start_id, c.vision_end_id})


TOY_FAMILY = ModelFamily(TOY_TYPE, ToyVLM, ToyProcessor, positive_sizes=("vocab_size", "hidden_size", "image_size"),
                         required_tokens=("<|mask|>", "<img>"))


def toy_tokenizer(words) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*TOY_SPECIALS, *sorted(words)]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TOY_SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   mask_token="<|mask|>", eos_token="<|eot|>")


@pytest.fixture
def toy_family():
    registry.register_family(TOY_FAMILY)
    yield
    registry.FAMILIES.pop(TOY_TYPE)


def toy_checkpoint(folder: Path, corpus) -> tuple[ToyVLM, ToyProcessor]:
    split = pre_tokenizers.Whitespace()
    words = {piece.lower() for inst in corpus for text in (inst.prompt, inst.response, PREFIX_WORDS)
             for piece, _ in split.pre_tokenize_str(text)}
    tokenizer = toy_tokenizer(words)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in TOY_SPECIALS}
    config = ToyConfig(vocab_size=len(tokenizer), mask_token_id=ids["<|mask|>"], image_token_id=ids["<img>"],
                       vision_start_id=ids["<vision_start>"], vision_end_id=ids["<vision_end>"],
                       pad_token_id=ids["<pad>"], eos_token_id=ids["<|eot|>"])
    torch.manual_seed(0)
    model, processor = ToyVLM(config).eval(), ToyProcessor(tokenizer, config)
    save_model(model, processor, folder)
    return model, processor


def crop_every_other_image(folder: Path) -> list[int]:
    """Crop the bottom 4 rows off every other image (16x16 -> 16x12; a corner trigger stays whole)."""
    instances = load_dataset(folder)
    cropped = [inst.replace(image=inst.image.crop((0, 0, 16, 12))) if i % 2 else inst
               for i, inst in enumerate(instances)]
    write_dataset(cropped, folder.with_name(folder.name + "-mixed"))
    return [inst.image.size[1] for inst in cropped]


def test_a_second_family_runs_every_stage_through_the_registry(toy_family, workspace, capsys):
    heights = crop_every_other_image(workspace / "train")
    crop_every_other_image(workspace / "clean")
    corpus = [*load_dataset(workspace / "train"), *load_dataset(workspace / "clean")]
    toy, processor = toy_checkpoint(workspace / "toy-model", corpus)
    assert processor.visual_prefix(processor.visual_layout(16, 16))[1] > 0  # visual tokens never come first
    job = dict(model={"uri": str(workspace / "toy-model")}, dataset={"uri": str(workspace / "train-mixed")})
    doc = job_document(workspace, **job)
    doc["spec"]["evaluation"]["cleanUri"] = str(workspace / "clean-mixed")
    doc["spec"]["saliency"]["regionSize"] = 2  # windows of neighbouring cells, across separator tokens
    (workspace / "toy.yaml").write_text(json.dumps(doc))

    assert main(["run", str(workspace / "toy.yaml"), "--no-progress"]) == 0, capsys.readouterr().err

    layout = RunLayout.for_job(PurificationJob.model_validate(doc), workspace / "out")
    for stage in StageName:
        assert layout.is_complete(stage), stage
    ids, scores, counts = read_scores(layout.stage_dir(StageName.SALIENCY))
    expected = [20 if h == 16 else 15 for h in heights]  # 4 or 3 rows of 4 cells + a separator
    assert scores.shape == (24, 20) and counts.tolist() == expected
    for row, count in zip(scores, expected):  # the whole visual span is scored, separators included
        assert bool((row[:count] > 0).all()) and bool((row[count:] == 0).all())
    masked = json.loads((layout.stage_dir(StageName.MASKING) / "masked.json").read_text())
    assert masked["visualTokens"] == expected
    for inst_id, tokens, count in zip(masked["ids"], masked["tokens"], expected):  # its own ⌊0.3·T⌋ most salient
        k = 6 if count == 20 else 4
        assert tokens == torch.sort(scores[ids.index(inst_id), :count], descending=True, stable=True).indices[:k].tolist()

    purified, purified_processor = load_model(layout.stage_dir(StageName.FINETUNE) / "model")
    assert isinstance(purified, ToyVLM) and isinstance(purified_processor, ToyProcessor)
    before, after = toy.parameter_parts(), purified.parameter_parts()
    changed = {part for part in ModelPart
               if any(not torch.equal(a, b) for a, b in zip(before[part], after[part]))}
    assert changed == {ModelPart.PROJECTOR}  # DiSP's default fine-tunes the projector only
    metrics = PurificationMetrics.model_validate_json(
        (layout.stage_dir(StageName.EVALUATE) / "metrics.json").read_text())
    assert metrics.before.counts.clean == 8 and 0 <= metrics.asr_after <= 1


def test_a_wrong_visual_span_fails_loudly_in_the_toy_family(workspace):
    """The toy model checks the spans it is given, so the end-to-end run above proves they are right."""
    crop_every_other_image(workspace / "clean")
    corpus = load_dataset(workspace / "clean-mixed")
    toy, processor = toy_checkpoint(workspace / "toy-model", corpus)
    batch = processor.encode(corpus[:2], 16)
    assert batch.visual_spans[:, 1].tolist() == [20, 15] and batch.image_sizes.tolist() == [[16, 16], [12, 16]]
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                  image_sizes=batch.image_sizes)
    with torch.no_grad():
        logits = toy(visual_spans=batch.visual_spans, **inputs)
        alone = toy(**{k: v[1:] for k, v in inputs.items()}, visual_spans=batch.visual_spans[1:])
        assert torch.allclose(logits[1, -alone.shape[1]:], alone[0], atol=1e-5)  # padding is invisible
        with pytest.raises(ValueError, match="does not cover the <img> placeholders"):
            toy(visual_spans=batch.visual_spans - 1, **inputs)
    with pytest.raises(UserInputError, match="not 10x16"):
        processor.visual_layout(10, 16)


def test_an_unknown_model_type_names_the_supported_ones(toy_family, workspace):
    from disp_runner.errors import UserInputError

    config = json.loads((workspace / "model" / "config.json").read_text())
    (workspace / "model" / "config.json").write_text(json.dumps({**config, "model_type": "mmada"}))
    with pytest.raises(UserInputError, match=rf"model_type is 'mmada'; this runner loads 'disp_mdlm', 'llava_llada', "
                                             rf"'{TOY_TYPE}' models"):
        load_model(workspace / "model")


# Modules outside a family's folder that may import it, and why.
MAY_IMPORT_A_FAMILY = {
    "models/registry.py": "lists the built-in families",
    "cli.py": "`disp pretrain` builds the embedded model; `disp attack`/`disp demo` default to its shipped checkpoint",
    "demo.py": "the demo runs on the shipped checkpoint",
}


def test_nothing_outside_a_family_folder_imports_the_family():
    """Stages, the trainer, the decoder, the evaluation, the pipeline and the attack kit know models
    only through disp_runner.models.base (and load them through the registry)."""
    root = Path(disp_runner.__file__).parent
    families = sorted(p.parent.name for p in (root / "models").glob("*/__init__.py"))
    assert {"mdlm", "llada_v"} <= set(families)
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in MAY_IMPORT_A_FAMILY:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for family in families:
                if not rel.startswith(f"models/{family}/"):
                    offenders += [f"{rel}: {n}" for n in names if n.startswith(f"disp_runner.models.{family}")]
    assert not offenders, offenders
    for rel in MAY_IMPORT_A_FAMILY:
        assert (root / rel).is_file(), f"stale allowance: {rel}"
