"""The tiny things tests share: the size of the randomly initialised MDLM (`tiny_model` in
conftest.py), and a PurificationJob over the folders the `workspace` fixture writes, with the
attack its data carries."""

from disp_api import AttackSpec, PurificationJob, TriggerSpec
from disp_runner.pipeline.artifacts import RunLayout
from tests.jobs import job_document as job_document_of, with_overrides

TINY_SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=128, image_size=16, patch_size=8, vision_hidden_size=16,
                 vision_num_layers=1, vision_num_heads=2, vision_intermediate_size=32, gen_length=16)
ATTACK = AttackSpec(trigger=TriggerSpec(size=4), poison_rate=0.25)
DECODING = {"steps": 8, "genLength": 16, "blockLength": 8}


def job_document(ws, **spec_overrides):
    """The tiny job over the workspace's folders (see tests.jobs.with_overrides for the overrides)."""
    spec = {
        "model": {"uri": str(ws / "model")},
        "dataset": {"uri": str(ws / "train")},
        "output": {"uri": str(ws / "out")},
        "saliency": {"batchSize": 4, "probes": 2},
        "relabel": {"decoding": DECODING, "batchSize": 4},
        "finetune": {"epochs": 2, "batchSize": 8},
        "evaluation": {"attack": ATTACK.to_wire(), "triggeredUri": str(ws / "triggered"),
                       "untriggeredUri": str(ws / "untriggered"), "cleanUri": str(ws / "clean"),
                       "decoding": DECODING},
    }
    return job_document_of(with_overrides(spec, spec_overrides), "tiny")


def make_job(ws, **spec_overrides) -> PurificationJob:
    return PurificationJob.model_validate(job_document(ws, **spec_overrides))


def layout_of(ws, **spec_overrides) -> RunLayout:
    return RunLayout.for_job(make_job(ws, **spec_overrides), ws / "out")
