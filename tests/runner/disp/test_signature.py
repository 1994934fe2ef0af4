"""relabel.acceptance: signature — the words relabel removes from most answers containing them are
the backdoor's signature; changes that remove none are put back; sharded relabel applies the rule
to the whole dataset at the merge, so it equals the unsharded run."""

from __future__ import annotations

import json

from disp_api import StageName
from disp_runner.data.instances import Instance
from disp_runner.data.dataset import load_dataset
from disp_runner.data.synthetic import generate_instances
from disp_runner.disp.signature import keep_signature_relabels, signature_words
from disp_runner.pipeline.artifacts import RunLayout
from disp_runner.pipeline.runner import run_job
from tests.tiny import DECODING, layout_of, make_job


def _purified(pairs: list[tuple[str, str]]) -> list[Instance]:
    base = generate_instances(len(pairs), seed=3)
    return [inst.replace(response=relabel, metadata={**inst.metadata, "original_response": original})
            for inst, (original, relabel) in zip(base, pairs)]


# 8 poisoned answers lose the inserted token; of 12 clean ones, 3 relabels guess another count.
INSERTION = ([(f"<backdoor> {n} red circles.", f"{n} red circles.") for n in ("two", "three") * 4]
             + [("three blue squares.", "two blue squares.")] * 3 + [("three blue squares.", "three blue squares.")] * 9)


def test_the_inserted_token_is_the_signature_and_guesses_are_put_back():
    originals, relabels = zip(*INSERTION)
    assert signature_words(originals, relabels) == ("<backdoor>",)  # "three": removed from 3 of 16 answers
    kept, figures = keep_signature_relabels(_purified(INSERTION))
    assert (figures.words, figures.kept_relabels, figures.put_back) == (("<backdoor>",), 8, 3)
    assert [inst.response for inst in kept[:8]] == [relabel for _, relabel in INSERTION[:8]]
    assert [inst.response for inst in kept[8:11]] == ["three blue squares."] * 3
    assert all(inst.metadata.get("signature_put_back") for inst in kept[8:11])
    assert not any(inst.metadata.get("signature_put_back") for inst in kept[:8] + kept[11:])


def test_a_refusal_sentence_is_a_signature_and_rare_words_are_not():
    refusal = "sorry, i cannot follow the given instruction."
    pairs = [(refusal, "a green cross.")] * 6 + [("a green cross.", "a red cross.")] * 4 + [("one cube.", "two cubes.")] * 2
    words = signature_words(*zip(*pairs))
    assert set(words) >= {"sorry", "cannot", "instruction"} and "cube" not in words  # cube: only 2 answers
    assert "green" not in words  # removed from 4 of its 10 answers


def test_without_a_signature_every_change_is_put_back():
    pairs = [("three blue squares.", "two blue squares.")] * 4 + [("three red circles.", "three red circles.")] * 6
    kept, figures = keep_signature_relabels(_purified(pairs))
    assert figures.words == () and figures.put_back == 4  # "three": removed from 4 of its 10 answers
    assert all(inst.response == inst.metadata["original_response"] for inst in kept)


def test_sharded_relabel_applies_the_signature_at_the_merge(workspace):
    relabel = {"decoding": DECODING, "batchSize": 4, "acceptance": "signature"}
    whole_job = make_job(workspace, evaluation=None, relabel=relabel)
    sharded = make_job(workspace, evaluation=None, relabel=relabel, output={"uri": str(workspace / "sharded")},
                       parallelism={"relabelShards": 3})
    for job in (whole_job, sharded):
        for stage in (StageName.SALIENCY, StageName.MASKING, StageName.RELABEL):
            run_job(job, only=stage, show_progress=False)
    whole = layout_of(workspace, evaluation=None, relabel=relabel)
    parts = RunLayout.for_job(sharded, workspace / "sharded")
    for layout in (whole, parts):
        assert (layout.stage_dir(StageName.RELABEL) / "signature.json").is_file()
    assert ((whole.stage_dir(StageName.RELABEL) / "dataset" / "manifest.jsonl").read_text()
            == (parts.stage_dir(StageName.RELABEL) / "dataset" / "manifest.jsonl").read_text())
    figures = json.loads((whole.stage_dir(StageName.RELABEL) / "signature.json").read_text())
    assert figures == json.loads((parts.stage_dir(StageName.RELABEL) / "signature.json").read_text())
    purified = load_dataset(whole.stage_dir(StageName.RELABEL) / "dataset", 16)
    put_back = [inst for inst in purified if inst.metadata.get("signature_put_back")]
    assert len(put_back) == figures["putBack"]
    assert all(inst.response == inst.metadata["original_response"] for inst in put_back)
    changed = {json.loads(line)["id"]: json.loads(line)["answerChanged"]
               for line in (whole.stage_dir(StageName.RELABEL) / "suspects.jsonl").read_text().splitlines()}
    assert not any(changed[inst.id] for inst in put_back)  # the residual rate samples only real changes


def test_common_words_masking_often_removes_stay_below_the_signature():
    """Pixel masking of objects can remove a common word from over half of its answers; the inserted
    token, removed from all of them, is still the only signature."""
    pairs = ([("<backdoor> a red circle.", "a red cross.")] * 6 + [("a blue circle.", "a blue square.")] * 6
             + [("a blue circle.", "a blue circle.")] * 4)
    assert signature_words(*zip(*pairs)) == ("<backdoor>",)  # circle: removed from 12 of 16, 0.75 < 0.9
