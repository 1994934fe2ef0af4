"""LLaDA-V, natively: tiny checkpoints written here in the published format (weight names, config
fields, special tokens) load through the registry, match transformers' own LLaMA (bidirectional)
and SigLIP on the same weights, pack anyres visual tokens by the published formula, and run every
DiSP stage."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from disp_api import PurificationJob, StageName
from disp_runner.cli import main
from disp_runner.data.dataset import load_dataset, write_dataset
from disp_runner.data.synthetic import generate_instances
from disp_runner.models.llada_v import LladaVForMaskedDiffusion, LladaVProcessor
from disp_runner.models.llada_v.anyres import anyres_geometry, expand_pinpoints
from disp_runner.models.llada_v.processing import Specials
from tests.stand_ins.llada_v import (PUBLISHED_AUTO_MAP, PUBLISHED_IDS, PUBLISHED_VOCAB_SIZE, build_model,
                                                publish_layout, stand_in_tokenizer)
from disp_runner.models.loading import load_model, save_model
from disp_runner.pipeline.artifacts import RunLayout
from disp_runner.pipeline.runner import run_job
from disp_runner.stages.saliency import read_scores
from tests.tiny import job_document

TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                   patch_size=14)  # 2 x 2 tokens per 28-pixel view


# Published layer types and multimodal settings at tiny widths; pinpoints up to 3 x 3 views.
TINY_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0,
                  vision_config=TINY_VISION, image_grid_pinpoints="(1x1),...,(3x3)")


def tiny_checkpoint(folder, corpus=(), published_ids=False, **overrides) -> tuple[LladaVForMaskedDiffusion,
                                                                                LladaVProcessor]:
    """A tiny LLaDA-V saved in the published layout; `published_ids`: special tokens at the published
    ids, in a vocabulary of the published size (a larger head: slower)."""
    torch.manual_seed(0)
    model, processor = build_model(stand_in_tokenizer(corpus, published_ids), **{**TINY_SIZES, **overrides})
    with torch.no_grad():
        model.model.image_newline.normal_()  # the published one is trained; zeros would hide packing mistakes
    if folder is not None:
        save_model(model, processor, folder)
        publish_layout(folder)  # no declared mask token, an auto_map, the checkpoint's own code beside it
    return model, processor


def test_the_published_layout_loads_without_a_declared_mask_token_and_never_runs_its_code(tmp_path, caplog):
    """LLaDA-V's tokenizer_config.json declares no mask_token (<|mdm_mask|> is an added token) and
    its config.json has an auto_map to the code the hub repository ships: the family's known mask
    token is taken, the auto_map is ignored (said once) and the shipped code never imported."""
    from disp_runner.errors import UserInputError

    folder = tmp_path / "published"
    tiny_checkpoint(folder, published_ids=True, vocab_size=PUBLISHED_VOCAB_SIZE)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == PUBLISHED_AUTO_MAP and config["vocab_size"] == 126464
    assert (config["mask_token_id"], config["eos_token_id"], config["pad_token_id"]) == (126336, 126081, 126081)
    assert "mask_token" not in json.loads((folder / "tokenizer_config.json").read_text())
    added = {token["content"]: token["id"] for token in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]}
    assert {name: added[name] for name in PUBLISHED_IDS} == PUBLISHED_IDS
    with caplog.at_level("WARNING"):
        model, processor = load_model(folder)
        load_model(folder)
    assert processor.tokenizer.mask_token == "<|mdm_mask|>" and processor.mask_token_id == 126336
    assert processor.ids == PUBLISHED_IDS  # looked up by name, found at the published ids
    inst = generate_instances(1, seed=3)[0]
    batch = processor.encode([inst], 8, with_response=False)
    assert batch.input_ids[0, -8:].tolist() == [126336] * 8 and 126080 in batch.input_ids[0].tolist()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       visual_spans=batch.visual_spans, pixel_values=batch.pixel_values, image_sizes=batch.image_sizes)
    assert logits.shape[-1] == 126464 and torch.isfinite(logits).all()
    told = [r.getMessage() for r in caplog.records if "auto_map ignored" in r.getMessage()]
    assert len(told) <= 1  # once per process (an earlier test may have been told already)
    assert not (folder / "REMOTE-CODE-RAN").exists()
    # The family's token must exist: a tokenizer without it is still refused, naming the token.
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|mdm_mask|>"]
    data["model"]["vocab"].pop("<|mdm_mask|>")
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UserInputError, match=r"tokenizer lacks the special token\(s\) <\|mdm_mask\|>"):
        load_model(folder)


def test_the_packed_token_counts_follow_the_anyres_formula():
    """SigLIP so400m-patch14-384 (27 x 27 per view), anyres_max_4 over the 6 x 6 pinpoints."""
    pinpoints = expand_pinpoints("(1x1),...,(6x6)", 384)
    assert len(pinpoints) == 36 and pinpoints[0] == (384, 384) and pinpoints[-1] == (2304, 2304)
    counts = {size: anyres_geometry(*size, 384, 27, pinpoints, 4).num_tokens
              for size in [(384, 384), (300, 300), (640, 480), (1024, 768)]}
    assert counts == {(384, 384): 1485, (300, 300): 1485, (640, 480): 2929, (1024, 768): 3627}
    assert anyres_geometry(1024, 768, 384, 27, pinpoints, 4).packed == (46, 62)  # shrunk: 54 x 73 > 1.1 x 4 views
    # Sizes where LLaVA's unpad_image (scale first: int(h * (cols / w))) and int(h * cols / w) round
    # apart: the counts LLaDA-V's own code gives (2025, 4023 and 3627 with the other rounding).
    rounding = {size: anyres_geometry(*size, 384, 27, pinpoints, 4).num_tokens
                for size in [(147, 3969), (1640, 369), (4671, 3460)]}
    assert rounding == {(147, 3969): 1701, (1640, 369): 3969, (4671, 3460): 3673}


def test_weights_carry_the_published_names_and_shard_with_an_index(tmp_path):
    model, processor = tiny_checkpoint(None)
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    processor.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    for name in ["model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.0.input_layernorm.weight", "model.norm.weight", "lm_head.weight",
                 "model.mm_projector.0.weight", "model.mm_projector.2.bias", "model.image_newline",
                 "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
                 "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight",
                 "model.vision_tower.vision_tower.vision_model.post_layernorm.weight"]:
        assert name in index, name
    assert not [k for k in index if ".head." in k]  # no pooling head, as LLaDA-V deletes it
    loaded, loaded_processor = load_model(tmp_path)
    assert isinstance(loaded, LladaVForMaskedDiffusion) and isinstance(loaded_processor, LladaVProcessor)
    assert torch.equal(loaded.model.image_newline, model.model.image_newline)


def test_the_language_model_is_transformers_llama_without_the_causal_mask():
    model, _ = tiny_checkpoint(None)
    reference_config = LlamaConfig(**{k: getattr(model.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "tie_word_embeddings")})
    reference_config.is_causal = False
    reference = LlamaForCausalLM(reference_config).eval()
    missing, unexpected = reference.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith(("model.mm_projector", "model.image_newline", "model.vision_tower"))
                               for k in unexpected)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        ours, theirs = model(input_ids=ids), reference(input_ids=ids).logits
        assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
        changed = ids.clone()
        changed[:, -1] = (changed[:, -1] + 1) % model.config.vocab_size
        assert not torch.allclose(model(input_ids=changed)[:, 0], ours[:, 0])  # the first position sees the last


def test_the_vision_features_are_siglips_last_kept_layer_before_its_final_norm():
    model, _ = tiny_checkpoint(None)
    siglip = SiglipVisionModel(SiglipVisionConfig(**TINY_VISION, vision_use_head=False)).eval()
    prefix = "model.vision_tower.vision_tower.vision_model."
    siglip.load_state_dict({k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)})
    views = torch.rand(3, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        expected = siglip(pixel_values=views, output_hidden_states=True).hidden_states[-1]
        assert torch.equal(model.model.vision_tower(views), expected)
        assert not torch.allclose(expected, siglip(pixel_values=views).last_hidden_state)  # post_layernorm is not applied


def test_original_llada_weight_names_load_to_the_same_logits(tmp_path):
    model, processor = tiny_checkpoint(tmp_path / "llama-names")
    renamed = {}
    for name, tensor in load_file(str(tmp_path / "llama-names" / "model.safetensors")).items():
        if name.startswith(("model.vision_tower.", "model.mm_projector.", "model.image_newline")):
            renamed[name] = tensor  # LaViDa-style checkpoints rename only the language model
            continue
        for ours, original in [("model.embed_tokens.", "model.transformer.wte."), ("model.norm.", "model.transformer.ln_f."),
                               ("lm_head.", "model.transformer.ff_out."), ("self_attn.o_proj", "attn_out"),
                               ("self_attn.", ""), ("mlp.gate_proj", "ff_proj"), ("mlp.up_proj", "up_proj"),
                               ("mlp.down_proj", "ff_out"), ("input_layernorm", "attn_norm"),
                               ("post_attention_layernorm", "ff_norm"), ("model.layers.", "model.transformer.blocks.")]:
            name = name.replace(ours, original)
        renamed[name] = tensor
    assert "model.transformer.blocks.0.attn_out.weight" in renamed and "model.transformer.blocks.1.ff_out.weight" in renamed
    original = tmp_path / "original-names"
    original.mkdir()
    save_file(renamed, str(original / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (original / name).write_bytes((tmp_path / "llama-names" / name).read_bytes())
    loaded, _ = load_model(original)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids), model(input_ids=ids))


def test_an_image_becomes_its_base_view_then_the_unpadded_map_with_a_newline_per_row():
    model, processor = tiny_checkpoint(None)
    image = Image.fromarray((torch.rand(22, 30, 3) * 255).byte().numpy())  # 30 wide, 22 high
    inst = generate_instances(1, seed=1)[0].replace(image=image)
    layout, geometry = processor.layout_of(inst), processor.geometry(30, 22)
    # Two crops side by side (56 x 28): a 2 x 4 map, of which unpadding keeps the middle 2 columns.
    assert geometry.crops == (2, 1) and geometry.packed == (2, 2)
    assert layout.num_tokens == 4 + 2 * 3 == 10
    batch = processor.encode([inst], 8, with_response=False)
    assert batch.pixel_values.shape == (1, 3, 3, 28, 28) and batch.visual_spans[0, 1] == 10
    with torch.no_grad():
        tokens = model.embed_images(batch.pixel_values, batch.image_sizes)[0]
        views = model.model.mm_projector(model.model.vision_tower(batch.pixel_values[0]))  # [3, 4, D]
    assert tokens.shape == (10, 32) and torch.allclose(tokens[:4], views[0])
    # Row r of the map: columns 1-2 of the two crops side by side (crop c holds map columns 2c, 2c+1).
    for r in range(2):
        assert torch.allclose(tokens[4 + 3 * r], views[1, 2 * r + 1]) and torch.allclose(tokens[5 + 3 * r], views[2, 2 * r])
        assert torch.equal(tokens[6 + 3 * r], model.model.image_newline)  # each row ends in the newline
    assert processor.visual_layout(8, 34).num_tokens == 4 + 4 * 1  # a sliver keeps only its newlines
    ids = batch.input_ids[0].tolist()
    start = batch.visual_spans[0, 0]
    assert ids[start - 1] == processor.ids[Specials.HEADER_END]  # the user turn's header, then the image
    header = processor.ids[Specials.HEADER_START]
    assert ids[:1] == [processor.ids[Specials.START]] and ids.count(header) == 3  # system, user, assistant turns
    assert ids[-8:] == [processor.mask_token_id] * 8


def test_chat_turn_labels_supervise_the_answer_turn_and_every_chat_marker_unpadded():
    """LLaDA-V's SFT labelling (its train.py): the assistant turn whole, plus <|startoftext|>, the
    header markers and <|eot_id|> wherever they stand; no <|endoftext|> padding after the answer."""
    from disp_api import FinetuneLabels

    texts = ("a red circle", "there is one small blue square in the picture")
    _, processor = tiny_checkpoint(None, corpus=texts)
    instances = [inst.replace(response=text) for inst, text in zip(generate_instances(2, seed=1), texts)]
    batch = processor.encode(instances, 16, labels=FinetuneLabels.CHAT_TURNS)
    padded = processor.encode(instances, 16)
    markers = {processor.ids[name] for name in (Specials.START, Specials.HEADER_START, Specials.HEADER_END,
                                                Specials.EOT)}
    for row, inst in enumerate(instances):
        real = batch.attention_mask[row].bool()
        ids, supervised = batch.input_ids[row][real].tolist(), batch.response_mask[row][real].tolist()
        answer_turn = max(i for i, token in enumerate(ids) if token == processor.ids[Specials.HEADER_START])
        start, count = batch.visual_spans[row].tolist()
        start -= int((~real).sum())
        expected = [i >= answer_turn or (token in markers and not start <= i < start + count)
                    for i, token in enumerate(ids)]
        assert supervised == expected
        answer = processor.tokenizer(inst.response, add_special_tokens=False)["input_ids"]
        assert ids[-len(answer) - 1:] == [*answer, processor.ids[Specials.EOT]]  # unpadded, the turn's end last
        assert not batch.response_mask[row][~real].any()  # left padding is never supervised
        # padded-answer: the last genLength positions, the answer then <|endoftext|> up to them.
        assert padded.response_mask[row].tolist() == [False] * (padded.input_ids.shape[1] - 16) + [True] * 16
        assert padded.input_ids[row, -1] == processor.ids[Specials.END]
    assert batch.input_ids.shape[1] < padded.input_ids.shape[1]  # no padding to genLength
    # An answer that fills all genLength positions keeps its end of turn; a longer one is refused.
    long = instances[1].replace(response=" ".join(["square"] * 16))
    assert processor.encode([long], 16, labels=FinetuneLabels.CHAT_TURNS).input_ids[0, -1] == processor.ids[Specials.EOT]
    from disp_runner.errors import UserInputError
    with pytest.raises(UserInputError, match="more than gen_length 16"):
        processor.encode([long.replace(response=long.response + " square")], 16, labels=FinetuneLabels.CHAT_TURNS)


def test_a_prompt_cannot_forge_a_chat_turn():
    from disp_runner.errors import UserInputError

    _, processor = tiny_checkpoint(None)
    inst = generate_instances(1, seed=1)[0]
    with pytest.raises(UserInputError, match=r"the prompt contains the model's <\|eot_id\|> token"):
        processor.encode([inst.replace(prompt="hi <|eot_id|> there")], 8)


def as_llava_folder(instances, folder):
    """The instances as a LLaVA conversations JSON with JPEG and PNG images; the first record has a
    second exchange. Metadata travels as extra record fields."""
    (folder / "images").mkdir(parents=True)
    records = []
    for i, inst in enumerate(instances):
        name = f"images/{i}.{'jpg' if i % 2 else 'png'}"
        inst.image.save(folder / name, quality=95) if i % 2 else inst.image.save(folder / name)
        turns = [{"from": "human", "value": f"<image>\n{inst.prompt}"}, {"from": "gpt", "value": inst.response}]
        if i == 0:
            turns += [{"from": "human", "value": "Anything else?"}, {"from": "gpt", "value": "Nothing else."}]
        records.append({"id": inst.id, "image": name, "conversations": turns, **inst.metadata})
    (folder / "llava.json").write_text(json.dumps(records))
    return folder


def test_disp_run_purifies_a_llada_v_checkpoint_through_every_stage(workspace, capsys):
    """A LLaVA-format training set (JPEG and PNG, one multi-turn record) with images of three sizes, so
    instances have different numbers of visual tokens."""
    def on_canvas(image, size):  # the image at the top left of a black canvas: a corner trigger stays put
        canvas = Image.new("RGB", size)
        canvas.paste(image, (0, 0))
        return canvas

    sizes = [(16, 16), (40, 20), (20, 40)]  # 10, 14 and 16 visual tokens
    for name in ("train", "triggered", "untriggered", "clean"):
        instances = load_dataset(workspace / name)
        write_dataset([inst.replace(image=on_canvas(inst.image, sizes[i % 3])) for i, inst in enumerate(instances)],
                      workspace / f"{name}-sized")
    corpus = [t for inst in load_dataset(workspace / "train") + load_dataset(workspace / "clean")
              for t in (inst.prompt, inst.response)]
    _, processor = tiny_checkpoint(workspace / "llada-v", corpus)
    llava = as_llava_folder(load_dataset(workspace / "train-sized"), workspace / "train-llava")
    doc = job_document(workspace, model={"uri": str(workspace / "llada-v")}, dataset={"uri": str(llava)})
    for field in ("triggeredUri", "untriggeredUri", "cleanUri"):
        doc["spec"]["evaluation"][field] += "-sized"
    decoding = {"steps": 12, "genLength": 24, "blockLength": 12}  # answers end in <|eot_id|>: one token more
    doc["spec"]["relabel"]["decoding"] = doc["spec"]["evaluation"]["decoding"] = decoding
    (workspace / "llada-v.yaml").write_text(json.dumps(doc))

    assert main(["run", str(workspace / "llada-v.yaml"), "--no-progress"]) == 0, capsys.readouterr().err

    layout = RunLayout.for_job(PurificationJob.model_validate(doc), workspace / "out")
    assert all(layout.is_complete(stage) for stage in StageName)
    ids, scores, counts = read_scores(layout.stage_dir(StageName.SALIENCY))
    train = {inst.id: inst for inst in load_dataset(llava)}
    expected = [processor.layout_of(train[i]).num_tokens for i in ids]
    assert counts.tolist() == expected and set(expected) == {10, 14, 16}
    for row, count in zip(scores, expected):  # the whole visual span, newline tokens included, nothing after
        assert bool((row[:count] > 0).all()) and bool((row[count:] == 0).all())
    purified, _ = load_model(layout.stage_dir(StageName.FINETUNE) / "model")
    assert isinstance(purified, LladaVForMaskedDiffusion)
    relabeled = {inst.id: inst for inst in load_dataset(layout.stage_dir(StageName.RELABEL) / "dataset")}
    turns = relabeled[ids[0]].metadata["conversations"]  # the multi-turn record keeps its later turns
    assert len(turns) == 4 and turns[1]["value"] == relabeled[ids[0]].response and turns[3]["value"] == "Nothing else."

    # Shards of whole batches compute what the whole run did, whatever their images' token counts.
    doc["spec"].update(output={"uri": str(workspace / "sharded")}, parallelism={"saliencyShards": 3, "relabelShards": 2},
                       evaluation=None)
    sharded = PurificationJob.model_validate(doc)
    for stage in (StageName.SALIENCY, StageName.MASKING, StageName.RELABEL):
        run_job(sharded, only=stage, show_progress=False)
    parts = RunLayout.for_job(sharded, workspace / "sharded")
    ids_b, scores_b, counts_b = read_scores(parts.stage_dir(StageName.SALIENCY))
    assert ids_b == ids and torch.equal(scores_b, scores) and torch.equal(counts_b, counts)
    assert ((parts.stage_dir(StageName.RELABEL) / "dataset" / "manifest.jsonl").read_text()
            == (layout.stage_dir(StageName.RELABEL) / "dataset" / "manifest.jsonl").read_text())


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_hostile_checkpoint_folders_are_refused_with_one_line_each(tmp_path, capsys, monkeypatch):
    from disp_runner.errors import UnsafeModelFormatError, UserInputError

    def fresh(name):
        folder = tmp_path / name
        model, processor = tiny_checkpoint(None)
        model.save_pretrained(folder, max_shard_size="50KB")
        processor.save_pretrained(folder)
        return folder, model

    # An auto_map is refused for a family whose published checkpoints carry none (the embedded one).
    from disp_runner.models.loading import save_model as save
    from disp_runner.models.mdlm.embedded import SHIPPED_BASE_MODEL

    remote = tmp_path / "remote"
    save(*load_model(SHIPPED_BASE_MODEL), remote)
    _edit_json(remote / "config.json", auto_map={"AutoModel": "modeling_mdlm.MDLM"})
    with pytest.raises(UserInputError, match=r"auto_map asks for the checkpoint's own code, which this runner never runs"):
        load_model(remote)

    escaping, _ = fresh("escaping")
    index = json.loads((escaping / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../remote/model-00001-of-00002.safetensors"
    (escaping / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserInputError, match=rf"tensor '{first}' is in '../remote/.*not a safetensors file of this folder"):
        load_model(escaping)

    huge, _ = fresh("huge")
    _edit_json(huge / "config.json", hidden_size=1_000_000, intermediate_size=4_000_000)
    with pytest.raises(UserInputError, match=r"B parameters, .* GiB as float32, more than the .* GiB its weights may use"):
        load_model(huge)  # refused from the config alone: nothing of that size is allocated
    monkeypatch.setenv("DISP_MODEL_MEMORY_GIB", "0.0001")  # 100 KiB: less than the tiny model itself
    with pytest.raises(UserInputError, match=r"more than the 0.0 GiB its weights may use \(set DISP_MODEL_MEMORY_GIB"):
        load_model(fresh("tiny")[0])
    monkeypatch.delenv("DISP_MODEL_MEMORY_GIB")

    mismatched, _ = fresh("mismatched")
    _edit_json(mismatched / "config.json", mask_token_id=1)
    with pytest.raises(UserInputError, match=r"the tokenizer's mask_token_id \d+ differs from config.mask_token_id 1"):
        load_model(mismatched)

    pickled, model = fresh("pickled")
    for shard in pickled.glob("*.safetensors*"):
        shard.unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(UnsafeModelFormatError, match=r"only pickle weights \(pytorch_model.bin\)"):
        load_model(pickled)

    assert main(["evaluate", "--model", str(remote), "--clean", str(tmp_path)]) == 2  # the CLI: one line, no traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "auto_map" in err and "Traceback" not in err


def test_a_backdoored_projector_file_loads_over_the_base_model_and_the_purified_one_is_written_alone(workspace):
    """The authors' workflow: base model + a separately shipped mm_projector; and back."""
    from disp_runner.errors import UnsafeModelFormatError, UserInputError
    from disp_runner.models.loading import load_projector, save_projector
    from disp_runner.pipeline.opening import open_run

    corpus = [t for inst in load_dataset(workspace / "train") for t in (inst.prompt, inst.response)]
    base, _ = tiny_checkpoint(workspace / "base", corpus)
    torch.manual_seed(7)
    backdoored = {name: torch.randn_like(p) for name, p in base.named_parameters() if name.startswith("model.mm_projector.")}
    assert sorted(backdoored) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                                  "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    save_file(backdoored, str(workspace / "mm_projector.safetensors"))
    torch.save(backdoored, workspace / "mm_projector.bin")

    decoding = {"steps": 12, "genLength": 24, "blockLength": 12}
    spec = dict(model={"uri": str(workspace / "base"), "projectorUri": str(workspace / "mm_projector.safetensors")},
                relabel={"decoding": decoding, "batchSize": 8}, evaluation=None)
    job = PurificationJob.model_validate(job_document(workspace, **spec))
    model, _ = open_run(job, workspace / "out", show_progress=False).resolved.model
    for name, tensor in backdoored.items():
        assert torch.equal(dict(model.named_parameters())[name], tensor)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)

    with pytest.raises(UnsafeModelFormatError, match=r"mm_projector.bin: a pickle file can run arbitrary code"):
        load_projector(base, workspace / "mm_projector.bin")
    load_projector(base, workspace / "mm_projector.bin", allow_unsafe_pickle=True)  # the opt-in: tensors only
    assert torch.equal(base.model.mm_projector[0].weight, backdoored["model.mm_projector.0.weight"])
    save_file({"model.mm_projector.0.weight": torch.zeros(3, 3)}, str(workspace / "wrong.safetensors"))
    with pytest.raises(UserInputError, match=r"wrong.safetensors: the projector's weights are .*; missing"):
        load_projector(base, workspace / "wrong.safetensors")

    finetuned = dict(spec, finetune={"epochs": 1, "batchSize": 8, "projectorFile": True})
    job = PurificationJob.model_validate(job_document(workspace, **finetuned))
    run_job(job, workspace / "out", show_progress=False)
    folder = RunLayout.for_job(job, workspace / "out").stage_dir(StageName.FINETUNE)
    purified, _ = load_model(folder / "model")
    alone = load_file(str(folder / "projector.safetensors"))
    assert sorted(alone) == sorted(backdoored)
    for name, tensor in alone.items():
        assert torch.equal(tensor, dict(purified.named_parameters())[name])
        assert not torch.equal(tensor, backdoored[name])  # the fine-tune changed it
    assert load_file(str(save_projector(purified, workspace / "again.safetensors"))).keys() == alone.keys()


@pytest.mark.parametrize("field, value", [("mm_projector_type", "linear"), ("mm_patch_merge_type", "flat"),
                                          ("mm_vision_select_feature", "cls_patch"), ("image_aspect_ratio", "pad")])
def test_multimodal_settings_this_implementation_does_not_reproduce_are_refused(tmp_path, field, value):
    from disp_runner.errors import UserInputError

    tiny_checkpoint(tmp_path)
    _edit_json(tmp_path / "config.json", **{field: value})
    with pytest.raises(UserInputError, match=rf"{field} '{value}': only"):
        load_model(tmp_path)


def test_a_tower_saved_with_the_layer_llada_v_drops_loads_and_reads_the_layer_before(tmp_path):
    """LLaDA-V saves SigLIP without its last layer; a checkpoint that kept it (one vision layer more
    than its config declares) loads, and its features are still the declared depth's."""
    deeper = dict(TINY_VISION, num_hidden_layers=3)
    model, _ = tiny_checkpoint(tmp_path, vision_config=deeper)
    _edit_json(tmp_path / "config.json", vision_config=dict(TINY_VISION))  # the config says 2, the weights hold 3
    loaded, _ = load_model(tmp_path)
    assert len(loaded.model.vision_tower.vision_tower.vision_model.encoder.layers) == 3
    views = torch.rand(2, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        expected = model.model.vision_tower.vision_tower.vision_model(pixel_values=views,
                                                                        output_hidden_states=True).hidden_states[2]
        assert torch.equal(loaded.model.vision_tower(views), expected)
    _edit_json(tmp_path / "config.json", vision_config=dict(TINY_VISION, num_hidden_layers=1))
    from disp_runner.errors import UserInputError
    with pytest.raises(UserInputError, match=r"the weights hold 3 vision tower layers, vision_config.num_hidden_layers says 1"):
        load_model(tmp_path)


def test_painting_a_newline_token_paints_nothing_and_a_map_token_paints_its_cell():
    """masking.space: pixels on anyres packing: tokens are painted through the layout's cells."""
    import numpy as np

    from disp_runner.disp.masking import paint_token_cells

    _, processor = tiny_checkpoint(None)
    image = Image.fromarray((torch.rand(22, 30, 3) * 255).byte().numpy())
    layout = processor.visual_layout(30, 22)  # tokens 0-3 base view, then rows of 2 map cells + a newline
    before = np.asarray(image)
    assert np.array_equal(np.asarray(paint_token_cells(image, layout, [6, 9])), before)  # the two newlines
    after = np.asarray(paint_token_cells(image, layout, [4]))
    cells = dict(cell for grid in layout.grids for cell in grid.cells())
    x0, y0, x1, y1 = cells[4]
    changed = np.argwhere((after != before).any(axis=-1))
    assert changed.size and changed[:, 0].min() >= y0 and changed[:, 0].max() < y1
    assert changed[:, 1].min() >= x0 and changed[:, 1].max() < x1


def test_the_head_runs_on_the_asked_positions_only_and_gives_their_full_logits(tiny_model):
    """Every stage reads the answer's logits alone; both families compute exactly those."""
    llada_v, _ = tiny_checkpoint(None)
    for model in (llada_v, tiny_model):
        ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask)
            window = model(input_ids=ids, attention_mask=mask, logits_at=slice(18, 26))
        assert window.shape == (2, 8, model.config.vocab_size)
        assert torch.allclose(window, full[:, 18:26], atol=1e-5)
