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
from disp_runner.pipeline.context import EVALUATION_INPUTS, StageContext, StageResult
from disp_runner.stages.finetune import MODEL_DIR



class EvaluateStage:
    name = StageName.EVALUATE
    inputs = (StageName.FINETUNE,)
    reads = EVALUATION_INPUTS

    def total_items(self, ctx: StageContext) -> int:
        masked = ctx.spec.evaluation is not None and ctx.spec.evaluation.masked_inference is not None
        return 3 if masked else 2  # evaluations: before, after (and the compromised model's masked inference)

    def run(self, ctx: StageContext, out: Path) -> StageResult:
        spec = ctx.spec.evaluation
        assert spec is not None, "the pipeline runs evaluate only when spec.evaluation is set"
        decoding = ctx.decoding(evaluation=True)
        triggered = ctx.load_evaluation_set(spec.triggered_uri, "spec.evaluation.triggeredUri")
        untriggered = (ctx.load_evaluation_set(spec.untriggered_uri, "spec.evaluation.untriggeredUri")
                       if spec.untriggered_uri else [])
        clean = ctx.load_evaluation_set(spec.clean_uri, "spec.evaluation.cleanUri") if spec.clean_uri else []
        attack = ctx.evaluation_attack()
        compromised, processor = ctx.compromised_model()
        purified_dir = ctx.input_dir(StageName.FINETUNE) / MODEL_DIR
        purified, _ = load_model(purified_dir)
        purified.to(ctx.device)
        results = []
        purified_uri = ctx.uri_of(ctx.layout.stage_dir(StageName.FINETUNE)) + "/" + MODEL_DIR
        for done, (model, name) in enumerate([(compromised, ctx.spec.model.uri), (purified, purified_uri)]):
            results.append(evaluate_model(model, processor, name, attack, triggered, untriggered, clean,
                                          decoding, show_progress=ctx.show_progress))
            ctx.report_progress(done + 1)
        before, after = results
        masked_inference = None
        if spec.masked_inference is not None:  # the authors' test-time defence, beside DiSP's result
            saliency = ctx.spec.saliency
            defence = MaskedInference(ratio=spec.masked_inference.ratio, seed=saliency.seed,
                                      batch_size=saliency.batch_size,
                                      saliency=SaliencyConfig.from_spec(saliency, decoding.block_length),
                                      field_name="spec.evaluation.maskedInference.ratio")
            masked_inference = evaluate_model(compromised, processor, ctx.spec.model.uri, attack, triggered,
                                              untriggered, clean, decoding, show_progress=ctx.show_progress,
                                              masked_inference=defence)
            ctx.report_progress(3)
        retention = None
        if clean and before.clean_performance > 0:
            retention = after.clean_performance / before.clean_performance
        audit = AuditFigures.model_validate_json((ctx.input_dir(StageName.FINETUNE) / AUDIT_FILE).read_text())
        metrics = PurificationMetrics(
            asr_before=before.asr_triggered, asr_after=after.asr_triggered,
            false_firing_before=before.asr_untriggered, false_firing_after=after.asr_untriggered,
            clean_performance_before=before.clean_performance if clean else None,
            clean_performance_after=after.clean_performance if clean else None,
            retention=retention, estimated_poisoned_share=audit.estimated_poisoned_share,
            residual_rate=audit.residual_rate, before=before, after=after, audit=audit,
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
