"""The stage plumbing on a tiny model: manifests, skipping, sharding, resuming, bad input."""

import json

import pytest
import torch
import yaml

from disp_api import PurificationMetrics, StageName
from disp_runner.models.loading import load_model
from disp_runner.cli import main
from disp_runner.data.dataset import load_dataset
from disp_runner.errors import EXIT_USER_ERROR, UserInputError
from disp_runner.pipeline.artifacts import STAGE_MANIFEST, RunLayout, Shard
from disp_runner.pipeline.runner import run_job
from disp_runner.stages.saliency import read_scores
from tests.tiny import DECODING, job_document, layout_of, make_job


def test_every_stage_publishes_its_outputs_with_a_manifest_written_last(workspace):
    outcomes = run_job(make_job(workspace), show_progress=False)
    assert [o.stage for o in outcomes] == list(StageName)
    layout = layout_of(workspace)
    for stage in StageName:
        manifest = json.loads((layout.stage_dir(stage) / STAGE_MANIFEST).read_text())
        listed = {f["path"] for f in manifest["files"]}
        on_disk = {p.relative_to(layout.stage_dir(stage)).as_posix()
                   for p in layout.stage_dir(stage).rglob("*") if p.is_file() and p.name != STAGE_MANIFEST}
        assert listed == on_disk and manifest["stage"] == stage.value
    ids, scores, counts = read_scores(layout.stage_dir(StageName.SALIENCY))
    assert counts.tolist() == [4] * 24
    assert scores.shape == (24, 4) and scores.dtype == torch.float64 and (scores >= 0).all()
    masked = json.loads((layout.stage_dir(StageName.MASKING) / "masked.json").read_text())
    assert all(len(tokens) == 1 for tokens in masked["tokens"])  # floor(0.3 * 4)
    assert (layout.stage_dir(StageName.MASKING) / "report.png").stat().st_size > 0
    purified = load_dataset(layout.stage_dir(StageName.RELABEL) / "dataset", 16)
    assert all("original_response" in inst.metadata for inst in purified)
    load_model(layout.stage_dir(StageName.FINETUNE) / "model")
    metrics = PurificationMetrics.model_validate_json(
        (layout.stage_dir(StageName.EVALUATE) / "metrics.json").read_text())
    triggered = len(load_dataset(workspace / "triggered"))
    assert metrics.before.counts.triggered == triggered and metrics.after.counts.clean == 8
    progress = json.loads(layout.progress_file.read_text())
    assert progress["stage"] == "evaluate" and progress["fraction"] == 1.0
    assert progress["itemsDone"] == progress["itemsTotal"] == 2  # in the stage's own unit: models evaluated
    assert not layout.checkpoint_dir(StageName.FINETUNE).exists()  # superseded by the published model


def test_a_complete_stage_is_skipped_and_an_incomplete_one_rerun(workspace):
    job = make_job(workspace, evaluation=None)
    run_job(job, only=StageName.SALIENCY, show_progress=False)
    layout = layout_of(workspace, evaluation=None)
    manifest = layout.stage_dir(StageName.SALIENCY) / STAGE_MANIFEST
    first = manifest.read_text()
    (outcome,) = run_job(job, only=StageName.SALIENCY, show_progress=False)
    assert outcome.skipped and manifest.read_text() == first
    manifest.unlink()  # as if the pod died before publishing
    (outcome,) = run_job(job, only=StageName.SALIENCY, show_progress=False)
    assert not outcome.skipped and manifest.is_file()


def test_sharded_saliency_and_relabel_equal_the_unsharded_run(workspace):
    run_job(make_job(workspace, evaluation=None), show_progress=False)
    sharded = make_job(workspace, evaluation=None, output={"uri": str(workspace / "sharded")},
                       parallelism={"saliencyShards": 4, "relabelShards": 3})
    run_job(sharded, show_progress=False)
    whole = layout_of(workspace, evaluation=None)
    parts = RunLayout.for_job(sharded, workspace / "sharded")
    ids_a, scores_a, _ = read_scores(whole.stage_dir(StageName.SALIENCY))
    ids_b, scores_b, _ = read_scores(parts.stage_dir(StageName.SALIENCY))
    assert ids_a == ids_b and torch.equal(scores_a, scores_b)
    assert (parts.root / "saliency-shards" / "3-of-4" / STAGE_MANIFEST).is_file()
    a = (whole.stage_dir(StageName.RELABEL) / "dataset" / "manifest.jsonl").read_text()
    b = (parts.stage_dir(StageName.RELABEL) / "dataset" / "manifest.jsonl").read_text()
    assert a == b


def test_shards_are_whole_batches_covering_every_item_once():
    ranges = [Shard(i, 4).batch_range(23, 4) for i in range(4)]
    assert [list(r) for r in ranges if r] and sum(len(r) for r in ranges) == 23
    assert sorted(i for r in ranges for i in r) == list(range(23))
    assert all(r.start % 4 == 0 for r in ranges)
    assert [len(Shard(i, 10).batch_range(8, 4)) for i in range(10)].count(0) == 8  # more shards than batches


@pytest.mark.parametrize("text", ["3/2", "2/2", "-1/2", "a/b", "1", "0/0"])
def test_bad_shard_specs_are_refused(text):
    with pytest.raises(UserInputError, match="shard"):
        Shard.parse(text)


def test_a_stage_never_reads_an_input_without_its_manifest(workspace):
    job = make_job(workspace, evaluation=None)
    run_job(job, only=StageName.SALIENCY, show_progress=False)
    layout = layout_of(workspace, evaluation=None)
    (layout.stage_dir(StageName.SALIENCY) / STAGE_MANIFEST).unlink()
    with pytest.raises(UserInputError, match="no stage-manifest.json"):
        run_job(job, only=StageName.MASKING, show_progress=False)
    assert not layout.stage_dir(StageName.MASKING).exists()


def test_a_corrupted_input_fails_its_checksum(workspace):
    job = make_job(workspace, evaluation=None)
    run_job(job, only=StageName.SALIENCY, show_progress=False)
    scores = layout_of(workspace, evaluation=None).stage_dir(StageName.SALIENCY) / "scores.safetensors"
    data = bytearray(scores.read_bytes())
    data[-1] ^= 0xFF
    scores.write_bytes(bytes(data))
    with pytest.raises(UserInputError, match="scores.safetensors: checksum mismatch"):
        run_job(job, only=StageName.MASKING, show_progress=False)
    assert not layout_of(workspace, evaluation=None).stage_dir(StageName.MASKING).exists()


def test_a_failing_stage_leaves_nothing_that_looks_complete(workspace, monkeypatch):
    from disp_runner.stages.relabel import RelabelStage

    def boom(*_a, **_k):
        raise RuntimeError("pod killed")

    job = make_job(workspace, evaluation=None)
    monkeypatch.setattr(RelabelStage, "run", boom)
    with pytest.raises(RuntimeError):
        run_job(job, show_progress=False)
    layout = layout_of(workspace, evaluation=None)
    assert layout.is_complete(StageName.MASKING) and not layout.stage_dir(StageName.RELABEL).exists()
    assert not [p for p in layout.root.iterdir() if "staging" in p.name]


# -- the command line: bad manifests and flags end in one line and exit code 2 ---------------------

def write_manifest(ws, document) -> str:
    path = ws / "job.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("change,message", [
    (lambda d: d["spec"]["masking"].update(ratio=0), "spec.masking.ratio: Input should be greater than 0"),
    (lambda d: d["spec"]["masking"].update(ratio=1.5), "spec.masking.ratio: Input should be less than or equal to 1"),
    (lambda d: d["spec"]["saliency"].update(probes=0), "spec.saliency.probes: Input should be greater than or equal to 1"),
    (lambda d: d["spec"]["saliency"].update(topK=1), "spec.saliency.topK: Input should be greater than or equal to 2"),
    (lambda d: d["spec"]["saliency"].update(topk=5), "spec.saliency.topk: unknown field"),
    (lambda d: d["spec"]["finetune"].update(epochs="many"), "spec.finetune.epochs: Input should be a valid number"),
    (lambda d: d["spec"].pop("dataset"), "spec.dataset: Field required"),
    (lambda d: d.update(kind="Job"), "kind: Input should be 'PurificationJob'"),
])
def test_bad_manifests_name_the_field_and_line(workspace, capsys, change, message):
    document = job_document(workspace, masking={"ratio": 0.3})
    change(document)
    code = main(["--no-progress", "run", write_manifest(workspace, document)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USER_ERROR and message in err and "job.yaml:" in err and len(err.splitlines()) == 1
    assert not (workspace / "out").exists()


def test_top_k_larger_than_the_vocabulary_fails_before_anything_completes(workspace, capsys):
    document = job_document(workspace, saliency={"topK": 100_000})
    code = main(["--no-progress", "run", write_manifest(workspace, document)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USER_ERROR and "spec.saliency.topK: 100000 is larger than the vocabulary" in err
    assert not layout_of(workspace, saliency={"topK": 100_000}).is_complete(StageName.SALIENCY)


def test_a_cache_the_model_family_cannot_run_fails_before_anything_completes(workspace, capsys, monkeypatch):
    import disp_runner.diffusion.prompt_cache as prompt_cache

    class NoFamilyHasIt:  # as if the model's family had no prompt cache
        pass

    monkeypatch.setattr(prompt_cache, "PromptCaching", NoFamilyHasIt)
    relabel = {"decoding": {**DECODING, "cache": "prefix"}, "batchSize": 4}
    code = main(["--no-progress", "run", write_manifest(workspace, job_document(workspace, relabel=relabel))])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USER_ERROR and len(err.splitlines()) == 1
    assert "spec.relabel.decoding.cache: prefix needs a model family with a prompt cache" in err
    assert not layout_of(workspace, relabel=relabel).is_complete(StageName.SALIENCY)
    monkeypatch.undo()  # the real families have one: the same manifest runs
    for stage in ("saliency", "masking", "relabel"):
        assert main(["--no-progress", "run", write_manifest(workspace, job_document(workspace, relabel=relabel)),
                     "--stage", stage]) == 0
    assert layout_of(workspace, relabel=relabel).is_complete(StageName.RELABEL)


def test_shard_flag_errors(workspace, capsys):
    path = write_manifest(workspace, job_document(workspace))
    for argv, message in [(["--stage", "saliency", "--shard", "3/2"], "--shard 3/2: need 0 <= index < count"),
                          (["--shard", "0/2"], "--shard, --merge and --round need --stage"),
                          (["--round", "2"], "--shard, --merge and --round need --stage"),
                          (["--stage", "finetune", "--shard", "0/2"], "finetune cannot be sharded")]:
        code = main(["--no-progress", "run", path, *argv])
        assert code == EXIT_USER_ERROR and message in capsys.readouterr().err


def test_cli_runs_one_shard_then_merges(workspace, capsys):
    path = write_manifest(workspace, job_document(workspace, parallelism={"saliencyShards": 2}))
    assert main(["--no-progress", "run", path, "--stage", "saliency", "--shard", "1/2"]) == 0
    layout = layout_of(workspace, parallelism={"saliencyShards": 2})
    assert layout.is_complete(StageName.SALIENCY, Shard(1, 2)) and not layout.is_complete(StageName.SALIENCY)
    assert main(["--no-progress", "run", path, "--stage", "saliency", "--merge"]) == EXIT_USER_ERROR
    assert "0-of-2" in capsys.readouterr().err
    assert main(["--no-progress", "run", path, "--stage", "saliency", "--shard", "0/2"]) == 0
    assert main(["--no-progress", "run", path, "--stage", "saliency", "--merge"]) == 0
    assert layout.is_complete(StageName.SALIENCY)
    assert read_scores(layout.stage_dir(StageName.SALIENCY))[1].shape[0] == 24


def test_blur_sigma_blurs_what_relabel_answers_but_not_what_the_fine_tune_learns_from(workspace, monkeypatch):
    import numpy as np
    from PIL import ImageFilter

    import disp_runner.stages.relabel as relabel

    seen = []
    real = relabel.generate_responses

    def spy(model, processor, instances, *args, **kwargs):
        seen.extend(instances)
        return real(model, processor, instances, *args, **kwargs)

    monkeypatch.setattr(relabel, "generate_responses", spy)
    layout = layout_of(workspace, evaluation=None, masking={"ratio": 0.3, "blurSigma": 1.5})
    for stage in (StageName.SALIENCY, StageName.MASKING, StageName.RELABEL):
        run_job(make_job(workspace, evaluation=None, masking={"ratio": 0.3, "blurSigma": 1.5}), only=stage,
                show_progress=False)
    originals = {inst.id: inst for inst in load_dataset(workspace / "train", 16)}
    assert len(seen) == len(originals)
    for inst in seen:
        expected = originals[inst.id].image.filter(ImageFilter.GaussianBlur(1.5))
        assert np.array_equal(np.asarray(inst.image), np.asarray(expected))
        assert not np.array_equal(np.asarray(inst.image), np.asarray(originals[inst.id].image))
    purified = load_dataset(layout.stage_dir(StageName.RELABEL) / "dataset", 16)
    for inst in purified:  # the fine-tune pairs the original image with the answer
        assert np.array_equal(np.asarray(inst.image), np.asarray(originals[inst.id].image))


def test_pixel_space_paints_the_masked_cells_instead_of_masking_tokens(workspace, monkeypatch):
    """masking.space: pixels — relabel answers the image with exactly the masked tokens' cells painted
    in the border's median colour and no visual token replaced; the fine-tune keeps the original."""
    import numpy as np

    import disp_runner.stages.relabel as relabel
    from disp_runner.models.loading import load_model
    from disp_runner.stages.masking import read_masked

    seen = []
    real = relabel.generate_responses

    def spy(model, processor, instances, *args, **kwargs):
        seen.append((list(instances), kwargs.get("transform_image_embeds")))
        return real(model, processor, instances, *args, **kwargs)

    monkeypatch.setattr(relabel, "generate_responses", spy)
    masking = {"ratio": 0.3, "space": "pixels"}
    layout = layout_of(workspace, evaluation=None, masking=masking)
    for stage in (StageName.SALIENCY, StageName.MASKING, StageName.RELABEL):
        run_job(make_job(workspace, evaluation=None, masking=masking), only=stage, show_progress=False)
    originals = {inst.id: inst for inst in load_dataset(workspace / "train", 16)}
    masked = read_masked(layout.stage_dir(StageName.MASKING))
    processor = load_model(workspace / "model").processor
    [(shown, transform)] = seen
    assert transform is None and len(shown) == len(originals)
    for inst in shown:
        before, after = np.asarray(originals[inst.id].image.convert("RGB")), np.asarray(inst.image)
        cells = dict(cell for grid in processor.layout_of(inst).grids for cell in grid.cells())
        painted = np.zeros(before.shape[:2], dtype=bool)
        for token in masked[inst.id]:
            x0, y0, x1, y1 = cells[token]
            painted[y0:y1, x0:x1] = True
        border = np.concatenate([before[0], before[-1], before[:, 0], before[:, -1]])
        assert painted.any() and (after[painted] == np.median(border, axis=0).astype(np.uint8)).all()
        assert np.array_equal(after[~painted], before[~painted])
    purified = load_dataset(layout.stage_dir(StageName.RELABEL) / "dataset", 16)
    for inst in purified:  # the fine-tune pairs the original image with the answer
        assert np.array_equal(np.asarray(inst.image), np.asarray(originals[inst.id].image))


def test_min_evidence_keeps_the_dataset_answer_unless_the_masked_input_prefers_the_new_one(workspace):
    """relabel.minEvidence: a changed answer whose evidence (how many nats more likely the masked input
    makes it than the dataset's answer, recomputed here independently) is below the bar is put back;
    the rest are the model's."""
    from disp_runner.models.loading import load_model
    from disp_runner.disp.masking import mask_image_embeds
    from disp_runner.evaluation import normalise_answer
    from disp_runner.diffusion.inference import first_step_log_likelihood
    from disp_runner.stages.masking import read_masked

    def relabelled(**relabel):
        job = make_job(workspace, evaluation=None, relabel={"decoding": DECODING, "batchSize": 4, **relabel})
        for stage in (StageName.SALIENCY, StageName.MASKING, StageName.RELABEL):
            run_job(job, only=stage, show_progress=False)
        layout = RunLayout.for_job(job, workspace / "out")
        return layout, {i.id: i for i in load_dataset(layout.stage_dir(StageName.RELABEL) / "dataset", 16)}

    layout, paper = relabelled()
    model, processor = load_model(workspace / "model")
    masked = read_masked(layout.stage_dir(StageName.MASKING))
    ids = list(paper)
    originals = [paper[i].replace(response=paper[i].metadata["original_response"]) for i in ids]
    rows = torch.tensor([masked[i] for i in ids])
    transform = lambda e, r: mask_image_embeds(e, rows[r], model.mask_embedding())  # noqa: E731
    margin = dict(zip(ids, (
        first_step_log_likelihood(model, processor, originals, [paper[i].response for i in ids], 16, 4, transform)
        - first_step_log_likelihood(model, processor, originals, [o.response for o in originals], 16, 4,
                                    transform)).tolist()))
    changed = [i for i in ids
               if normalise_answer(paper[i].response) != normalise_answer(paper[i].metadata["original_response"])]
    bar = sorted(margin[i] for i in changed)[len(changed) // 2]  # half the changes fall below it
    layout, gated = relabelled(minEvidence=bar)
    assert set(gated) == set(paper)
    kept = 0
    for inst_id in ids:
        new, result = paper[inst_id], gated[inst_id]
        assert result.metadata["relabel_evidence"] == pytest.approx(margin[inst_id], abs=1e-3)
        if inst_id not in changed or margin[inst_id] >= bar:
            assert result.response == new.response  # unchanged, or enough evidence: the model's answer
        else:
            assert result.response == new.metadata["original_response"]  # too little: the dataset's answer
            kept += 1
    assert 0 < kept < len(changed)
    manifest = json.loads((layout.stage_dir(StageName.RELABEL) / STAGE_MANIFEST).read_text())
    assert manifest["metrics"]["keptOriginal"] == kept


def test_saliency_scores_the_tokens_for_the_prompt_relabel_asks(workspace):
    """With a fixed purification prompt (the authors': "Describe this image in detail."), the
    tokens are scored for that question, not each instance's own: the scores equal those of the
    same data whose prompts were replaced, and differ from the instance-prompt scores."""
    from disp_runner.data.dataset import write_dataset

    prompt = "describe this image in detail"
    own = layout_of(workspace, evaluation=None)
    run_job(make_job(workspace, evaluation=None), only=StageName.SALIENCY, show_progress=False)
    fixed = make_job(workspace, evaluation=None, output={"uri": str(workspace / "fixed")},
                     relabel={"decoding": DECODING, "batchSize": 4, "prompt": prompt})
    run_job(fixed, only=StageName.SALIENCY, show_progress=False)
    write_dataset([inst.replace(prompt=prompt) for inst in load_dataset(workspace / "train", 16)],
                  workspace / "asked")
    asked = make_job(workspace, evaluation=None, output={"uri": str(workspace / "asked-out")},
                     dataset={"uri": str(workspace / "asked")})
    run_job(asked, only=StageName.SALIENCY, show_progress=False)

    def scores(job, root):
        return read_scores(RunLayout.for_job(job, root).stage_dir(StageName.SALIENCY))[1]

    with_fixed = scores(fixed, workspace / "fixed")
    assert torch.equal(with_fixed, scores(asked, workspace / "asked-out"))
    assert not torch.allclose(with_fixed, read_scores(own.stage_dir(StageName.SALIENCY))[1])


@pytest.mark.parametrize("empty_answers", ["drop", "keep"])
def test_empty_relabel_answers_are_dropped_or_kept_and_counted_either_way(workspace, monkeypatch, empty_answers):
    import disp_runner.stages.finetune as finetune
    import disp_runner.stages.relabel as relabel
    from disp_runner.pipeline.artifacts import read_stage_manifest

    real = relabel.generate_responses
    silent: set[str] = set()

    def every_third_empty(model, processor, instances, *args, **kwargs):
        answers = list(real(model, processor, instances, *args, **kwargs))
        for index, inst in enumerate(instances):
            if index % 3 == 0 or "all" in silent:
                answers[index] = ""
                silent.add(inst.id)
        return answers

    trained = []
    real_train = finetune.train_masked_diffusion
    monkeypatch.setattr(finetune, "train_masked_diffusion",
                        lambda model, data, *a, **k: trained.append(data) or real_train(model, data, *a, **k))
    monkeypatch.setattr(relabel, "generate_responses", every_third_empty)
    spec = dict(evaluation=None, relabel={"emptyAnswers": empty_answers}, finetune={"epochs": 1, "batchSize": 8})
    job = make_job(workspace, **spec)
    for stage in (StageName.SALIENCY, StageName.MASKING, StageName.RELABEL, StageName.FINETUNE):
        run_job(job, only=stage, show_progress=False)
    layout = layout_of(workspace, **spec)
    purified = {inst.id: inst for inst in load_dataset(layout.stage_dir(StageName.RELABEL) / "dataset", 16,
                                                      empty_responses=True)}
    train = load_dataset(workspace / "train", 16)
    metrics = read_stage_manifest(layout.stage_dir(StageName.RELABEL))["metrics"]
    assert silent and metrics["emptyResponses"] == len(silent)
    if empty_answers == "drop":
        assert set(purified) == {inst.id for inst in train} - silent
    else:  # the authors': the empty answer replaces the dataset's, and the fine-tune learns it
        assert set(purified) == {inst.id for inst in train}
        assert all(purified[i].response == "" and purified[i].metadata["original_response"] for i in silent)
        (data,) = trained
        rows = data.batch([k for k, inst in enumerate(data.instances) if inst.id in silent])
        eos = data.processor.tokenizer.eos_token_id
        assert (rows.input_ids[:, -16:] == eos).all()  # an empty answer: the end token at once, then padding
        # Every answer empty: nothing is left to learn an answer from; refused, nothing published.
        silent.add("all")
        job = make_job(workspace, **{**spec, "output": {"uri": str(workspace / "silent")}})
        for stage in (StageName.SALIENCY, StageName.MASKING):
            run_job(job, only=stage, show_progress=False)
        with pytest.raises(UserInputError, match="every answer was empty"):
            run_job(job, only=StageName.RELABEL, show_progress=False)
        assert not RunLayout.for_job(job, workspace / "silent").stage_dir(StageName.RELABEL).exists()
        # Sharded, each shard's part is published; the whole output is refused at the merge.
        sharded = {**spec, "output": {"uri": str(workspace / "silent-sharded")}, "parallelism": {"relabelShards": 2}}
        sharded_job = make_job(workspace, **sharded)
        with pytest.raises(UserInputError, match="every answer was empty"):
            run_job(sharded_job, show_progress=False)
        sharded_layout = RunLayout.for_job(sharded_job, workspace / "silent-sharded")
        assert sharded_layout.is_complete(StageName.RELABEL, Shard(1, 2))
        assert not sharded_layout.stage_dir(StageName.RELABEL).exists()
    # A user's dataset with an empty response is still refused, naming the line.
    manifest = workspace / "train" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0], lines[1].replace(json.loads(lines[1])["response"], "")] + lines[2:]))
    with pytest.raises(UserInputError, match=r"manifest.jsonl:2: field 'response' must be a non-empty string"):
        load_dataset(workspace / "train", 16)
