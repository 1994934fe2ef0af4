"""The DiSP stages, one module each, behind the `Stage` interface of disp_runner.pipeline."""

from disp_api import StageName
from disp_runner.pipeline.stage import Stage
from disp_runner.stages.evaluate import EvaluateStage
from disp_runner.stages.finetune import FinetuneStage
from disp_runner.stages.masking import MaskingStage
from disp_runner.stages.relabel import RelabelStage
from disp_runner.stages.saliency import SaliencyStage

STAGES: dict[StageName, Stage] = {stage.name: stage for stage in (
    SaliencyStage(), MaskingStage(), RelabelStage(), FinetuneStage(), EvaluateStage())}
