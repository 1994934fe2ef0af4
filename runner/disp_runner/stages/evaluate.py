"""Stage `evaluate`: ASR on triggered inputs, false firing on the same inputs without the trigger,
and clean performance, for the compromised model and the purified one.

Output: metrics.json, a `disp_api.PurificationMetrics` (schema in docs/method.md "metrics.json"), which
the operator copies into the PurificationJob's status.
"""

from __future__ import annotations

import json
from pathlib import Path

from disp_api import AuditFigures, PurificationMetrics, StageName
from disp_api.contract import AUDIT_FILE, METRICS_FILE
from disp_runner.disp.saliency import SaliencyConfig
from disp_runner.evaluation import MaskedInference, evaluate_model
from disp_runner.models.loading import load_model
from disp_runner.pipeline.inputs import EVALUATION_INPUTS, SpecInput
from disp_runner.pipeline.stage import StageInputs, StageResult
from disp_runner.stages.finetune import MODEL_DIR



class EvaluateStage:
    name = StageName.EVALUATE
    inputs = (StageName.FINETUNE,)
    reads = EVALUATION_INPUTS
    whole_output_steps = ()

    def total_items(self, inputs: StageInputs) -> int:
        masked = inputs.spec.evaluation is not None and inputs.spec.evaluation.masked_inference is not None
        return 3 if masked else 2  # evaluations: before, after (and the compromised model's masked inference)

    def run(self, inputs: StageInputs, out: Path) -> StageResult:
        spec = inputs.spec.evaluation
        assert spec is not None, "the pipeline runs evaluate only when spec.evaluation is set"
        decoding = inputs.evaluation_decoding
        triggered = inputs.evaluation_set(SpecInput.TRIGGERED)
        untriggered = inputs.evaluation_set(SpecInput.UNTRIGGERED)
        clean = inputs.evaluation_set(SpecInput.CLEAN)
        attack = inputs.evaluation_attack
        compromised, processor = inputs.model
        finetune_dir = inputs.upstream[StageName.FINETUNE]
        purified, _ = load_model(finetune_dir / MODEL_DIR)
        purified.to(inputs.device)
        results = []
        purified_uri = inputs.upstream_uris[StageName.FINETUNE] + "/" + MODEL_DIR
        for done, (model, name) in enumerate([(compromised, inputs.spec.model.uri), (purified, purified_uri)]):
            results.append(evaluate_model(model, processor, name, attack, triggered, untriggered, clean,
                                          decoding, show_progress=inputs.show_progress))
            inputs.report_progress(done + 1)
        before, after = results
        masked_inference = None
        if spec.masked_inference is not None:  # the authors' test-time defence, beside DiSP's result
            saliency = inputs.spec.saliency
            defence = MaskedInference(ratio=spec.masked_inference.ratio, seed=saliency.seed,
                                      batch_size=saliency.seed_group,
                                      saliency=SaliencyConfig.from_spec(saliency, decoding.block_length),
                                      field_name="spec.evaluation.maskedInference.ratio")
            masked_inference = evaluate_model(compromised, processor, inputs.spec.model.uri, attack, triggered,
                                              untriggered, clean, decoding, show_progress=inputs.show_progress,
                                              masked_inference=defence)
            inputs.report_progress(3)
        retention = None
        if clean and before.clean_performance > 0:
            retention = after.clean_performance / before.clean_performance
        audit = AuditFigures.model_validate_json((finetune_dir / AUDIT_FILE).read_text())
        metrics = PurificationMetrics(
            asr_before=before.asr_triggered, asr_after=after.asr_triggered,
            false_firing_before=before.asr_untriggered, false_firing_after=after.asr_untriggered,
            clean_performance_before=before.clean_performance if clean else None,
            clean_performance_after=after.clean_performance if clean else None,
            retention=retention, estimated_poisoned_share=audit.estimated_poisoned_share,
            residual_rate=audit.residual_rate, residual_sample=audit.residual_sample, before=before, after=after, audit=audit,
            masked_inference=masked_inference,
            masked_inference_ratio=spec.masked_inference.ratio if spec.masked_inference else None)
        (out / METRICS_FILE).write_text(json.dumps(metrics.to_wire(), indent=2))
        summary = {k: v for k, v in metrics.to_wire().items()
                   if k not in ("before", "after", "schemaVersion", "audit", "maskedInference")}
        if masked_inference is not None:
            summary["asrMaskedInference"] = masked_inference.asr_triggered
            if clean:
                summary["cleanPerformanceMaskedInference"] = masked_inference.clean_performance
        return StageResult(items=len(triggered) + len(untriggered) + len(clean), metrics=summary)
