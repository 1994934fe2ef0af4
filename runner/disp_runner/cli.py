"""`disp`: the runner's command line.

User mistakes (bad files, flags, manifests) end with one line on stderr naming what is wrong and
exit code 2 (`EXIT_USER_ERROR`); a traceback means a bug.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import sys
from pathlib import Path
from typing import Callable, Sequence

from pydantic import ValidationError

from disp_api.attack import AttackTarget, TriggerKind
from disp_api.base import SEED_MAX
from disp_api.spec import MAX_ROUNDS
from disp_api.version import VERSION
from disp_api import LogFormat

from disp_runner.folders import write_atomically
from disp_runner.errors import (EXIT_INTERNAL_ERROR, EXIT_NOT_VERIFIED, EXIT_TRANSIENT_ERROR, EXIT_USER_ERROR,
                                EXIT_WEAK_BACKDOOR, NotVerifiedError, TransientError, UserInputError,
                                WeakBackdoorError)
from disp_runner import logs
from disp_runner.scratch import prepare_scratch
from disp_runner.threads import apply_threads, choose_threads


def _add_trigger_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trigger")
    g.add_argument("--trigger", choices=[kind.value for kind in TriggerKind], default=TriggerKind.PATCH.value)
    # No defaults here: a flag given together with one that makes it meaningless is an error
    # (_refuse_contradictions); TriggerSpec's defaults fill in the rest.
    g.add_argument("--trigger-size", type=_bounded_int(1, 1024), default=None, help="patch side in pixels (default 6)")
    g.add_argument("--trigger-colour", default=None, help="patch colour R,G,B (default black)")
    g.add_argument("--trigger-corner", choices=["top-left", "top-right", "bottom-left", "bottom-right"],
                   default=None, help="where the patch goes (default top-left)")
    g.add_argument("--trigger-position", default=None,
                   help="explicit trigger position X,Y: the patch's (overrides the corner), "
                        "or where a --trigger-pattern is blended at its own size")
    g.add_argument("--trigger-pattern", default=None, help="PNG: the patch (patch) or the image to blend (blended)")
    g.add_argument("--blend-alpha", type=float, default=0.2)  # checked by the attack spec
    g.add_argument("--sig-delta", type=float, default=None, help="sig: the signal's amplitude in pixel values (default 40)")
    g.add_argument("--sig-frequency", type=float, default=None,
                   help="sig: the signal's periods across the image's width (default 6)")


def _int_tuple(text: str | None, flag: str, n: int) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserInputError(f"{flag}: expected {n} comma-separated integers, got {text!r}") from None
    if len(values) != n:
        raise UserInputError(f"{flag}: expected {n} comma-separated integers, got {text!r}")
    return values


def _bounded_int(low: int, high: int):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value
    return parse


def _positive_float(high: float):
    """An argparse type: a finite number in (0, high]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not 0 < value <= high:
            raise argparse.ArgumentTypeError(f"must be a finite number in (0, {high:g}], got {text}")
        return value
    return parse


SEED = _bounded_int(0, SEED_MAX)  # the same bound as the manifests' seeds
COUNT = _bounded_int(1, 10_000_000)
BATCH = _bounded_int(1, 65536)


def _validation_message(exc: ValidationError, prefix: str) -> str:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "value"
    return f"{prefix}{where}: {err['msg']}"


class _OneLineErrors(argparse.ArgumentParser):
    """argparse, but a wrong flag ends with one line (and exit 2) like every other user error."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_global_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Flags every command takes, before or after its name. On the subcommands they default to
    SUPPRESS, so one given before the name is not reset by the subcommand's parser."""
    def default(value):
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--no-progress", action="store_true", default=default(False), help="hide progress bars")
    parser.add_argument("--debug", action="store_true", default=default(False),
                        help="show Python tracebacks of internal errors")
    parser.add_argument("--threads", type=_bounded_int(1, 1024), default=default(None),
                        help="CPU threads for torch (default: OMP_NUM_THREADS, else the container's CPU quota, "
                             "else the cores this process may use)")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="disp", description="DiSP runner: backdoor purification for MDLMs.")
    parser.add_argument("--version", action="version", version=f"disp {VERSION}")
    _add_global_flags(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_global_flags(common, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineErrors)

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    p = add("data", help="generate a synthetic multimodal dataset (manifest.jsonl + PNGs)")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=COUNT, default=1000)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--kinds", default="describe,question,classify", help="comma-separated task kinds")
    p.add_argument("--kind-weights", default=None,
                   help="shares of the task kinds, in --kinds order, e.g. 0.5,0.25,0.25 (default: equal)")
    p.add_argument("--class-weights", default=None, help="e.g. circle=0.4 (the rest share the remainder)")
    p.add_argument("--id-prefix", default="syn", help="instance ids are PREFIX-SEED-NUMBER (default syn)")
    p.add_argument("--image-size", type=_bounded_int(16, 1024), default=48,
                   help="image side in pixels (16 to 1024; the embedded model uses 48)")

    p = add("pretrain", help="train the clean base MDLM of the embedded default")
    p.add_argument("--out", required=True)
    p.add_argument("--vision-instances", type=COUNT, default=None, help="stage 1 (vision tower) images")
    p.add_argument("--vision-epochs", type=_positive_float(1000), default=None)
    p.add_argument("--num-instances", type=COUNT, default=None, help="stage 2 (projector + LM) instances")
    p.add_argument("--epochs", type=_positive_float(1000), default=None)
    p.add_argument("--lr", type=_positive_float(1.0), default=None)
    p.add_argument("--batch-size", type=BATCH, default=None)
    p.add_argument("--seed", type=SEED, default=None)

    p = add("attack", help="poison a dataset and inject a backdoor (projector + LM by default, "
                                      "see --trainable)")
    p.add_argument("--base", default=None, help="clean base model folder (default: the shipped one)")
    p.add_argument("--train", required=True, help="clean training dataset folder")
    p.add_argument("--test", required=True, help="clean held-out dataset folder (for the ASR test sets)")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=["kit", "authors"], default="kit",
                   help="whose attack the other flags start from: this kit's (a 6-pixel black corner patch, "
                        "insertion, projector + LM) or the DiSP authors' (a black patch of 20/384 of the image side "
                        "at (0,0), refusal, projector only for 20 epochs at lr 1e-4 on chat-turn labels, measured "
                        "with their decoding stop rule)")
    p.add_argument("--target", choices=[target.value for target in AttackTarget], default=None,
                   help="the backdoor's target (default: the preset's, insertion or refusal)")
    p.add_argument("--source-class", default="circle")
    p.add_argument("--target-class", default="square")
    p.add_argument("--poison-rate", type=float, default=0.2)  # checked by the attack spec
    p.add_argument("--epochs", type=_positive_float(1000), default=None, help="injection epochs (default: the kit's)")
    p.add_argument("--lr", type=_positive_float(1.0), default=None,
                   help="injection learning rate (default: the kit's)")
    p.add_argument("--batch-size", type=BATCH, default=None)
    p.add_argument("--trainable", choices=["projector", "projector-and-lm", "all"], default=None,
                   help="weights the injection fine-tunes (default: the kit's, see docs/attack-kit.md)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--target-asr", type=_positive_float(1.0), default=None,
                   help="keep training (in rounds) until the ASR on the kit's validation split reaches this "
                        "(default 0.9); a backdoor that does not exits 3")
    p.add_argument("--max-epochs", type=_positive_float(10_000), default=None,
                   help="epochs in all while reaching --target-asr (default: 3x --epochs)")
    p.add_argument("--allow-weak", action="store_true",
                   help="exit 0 even when the backdoor stays below --target-asr (attack.json still says so)")
    p.add_argument("--allow-unsafe-pickle", action="store_true",
                   help="allow loading pickle (.bin/.pt) weights: only for models you trust")
    _add_trigger_args(p)

    p = add("evaluate", help="ASR, false firing and clean performance of a model")
    p.add_argument("--model", required=True)
    p.add_argument("--attack", default=None, help="attack folder (attack.json + test sets) for ASR")
    p.add_argument("--clean", required=True, help="clean held-out dataset folder")
    p.add_argument("--out", default=None, help="write metrics.json here")
    p.add_argument("--limit", type=COUNT, default=None, help="score at most this many instances per set")
    p.add_argument("--masked-inference", metavar="RHO", type=_positive_float(1.0), default=None,
                   help="also answer with each input's top RHO most salient visual tokens masked (the DiSP "
                        "authors' test-time defence; saliency as the spec's defaults score it)")
    p.add_argument("--allow-unsafe-pickle", action="store_true")

    p = add("run", help="run a PurificationJob manifest (YAML/JSON): all stages, or one stage/shard")
    p.add_argument("manifest", nargs="?", help="PurificationJob YAML or JSON file (- reads standard input)")
    p.add_argument("--manifest-env", metavar="VAR", default=None,
                   help="read the manifest (JSON) from this environment variable instead (runner pods)")
    p.add_argument("--stage", choices=[s.value for s in _stage_names()], default=None,
                   help="run only this stage (what a runner pod does); default: all, in order")
    p.add_argument("--shard", default=None, help="INDEX/COUNT: only this shard of a sharded stage (saliency, relabel)")
    p.add_argument("--merge", action="store_true", help="combine the completed shards of --stage")
    p.add_argument("--round", type=_bounded_int(1, MAX_ROUNDS), default=None, dest="round_number",
                   help="with --stage: the purification round it belongs to (spec.rounds; default 1)")
    p.add_argument("--output", default=None, help="output root (default: the manifest's spec.output.uri)")
    p.add_argument("--processes", type=_bounded_int(1, 64), default=None,
                   help="fine-tune processes on this node, one per GPU (default: the GPUs visible, 1 on CPU)")
    p.add_argument("--nodes", type=_bounded_int(1, 1024), default=1,
                   help="pods the fine-tune spans (node 0's address from MASTER_ADDR/MASTER_PORT)")
    p.add_argument("--node-rank", type=_bounded_int(0, 1023), default=0,
                   help="this pod's place among --nodes (0 publishes the stage's output)")
    p.add_argument("--log-format", choices=[f.value for f in LogFormat], default=LogFormat.TEXT.value,
                   help="json: every line one JSON object with the job, namespace, stage and shard it concerns "
                        "(progress bars off)")
    p.add_argument("--signing-key", metavar="FILE", default=None,
                   help="Ed25519 private key (PEM) to sign the run's provenance.json with (provenance.sig.json)")

    p = add("verify", help="check a run folder against its provenance.json: the signature, every file's digest, "
                           "the chain of stage manifests and the inputs it was made from")
    p.add_argument("run", help="the run folder, <output>/runs/<namespace>/<name>/<run id>, local or s3://")
    p.add_argument("--key", metavar="PUBLIC.pem", default=None,
                   help="Ed25519 public key the run must be signed with (a signed run needs it)")
    p.add_argument("--skip-inputs", action="store_true",
                   help="do not read the inputs again (model, dataset, evaluation sets): check the run folder only")
    p.add_argument("--endpoint", metavar="HOST[:PORT]", default=None,
                   help="S3 endpoint of an s3:// run or input (credentials: DISP_S3_ACCESS_KEY, DISP_S3_SECRET_KEY)")
    p.add_argument("--insecure", action="store_true", help="talk plain HTTP to the S3 endpoint")

    p = add("demo", help="the whole story on the embedded default (no cluster, no server)")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--base", default=None, help="clean base model folder (default: the shipped one)")
    p.add_argument("--processes", type=_bounded_int(1, 64), default=None,
                   help="scenarios run at once, each in its own process with a share of --threads "
                        "(default: one per thread on a CPU, one on a GPU)")
    return parser


def _cmd_data(args) -> None:
    from disp_runner.data.synthetic import generate_dataset
    from disp_runner.data.vocabulary import TaskKind

    try:
        kinds = tuple(TaskKind(k.strip()) for k in args.kinds.split(","))
    except ValueError:
        raise UserInputError(f"--kinds: unknown task kind in {args.kinds!r}; "
                             f"choose from {', '.join(k.value for k in TaskKind)}") from None
    weights = None
    if args.class_weights:
        try:
            weights = {k: float(v) for k, v in (item.split("=") for item in args.class_weights.split(","))}
        except ValueError:
            raise UserInputError(f"--class-weights: expected NAME=SHARE[,NAME=SHARE], got {args.class_weights!r}") from None
    kind_weights = None
    if args.kind_weights:
        try:
            kind_weights = tuple(float(v) for v in args.kind_weights.split(","))
        except ValueError:
            raise UserInputError(f"--kind-weights: expected numbers separated by commas, got {args.kind_weights!r}") \
                from None
        if len(kind_weights) != len(kinds) or not all(math.isfinite(w) and w >= 0 for w in kind_weights) \
                or not sum(kind_weights) > 0:
            raise UserInputError(f"--kind-weights: need {len(kinds)} non-negative shares (one per --kinds entry), "
                                 f"not all zero, got {args.kind_weights!r}")
    if not args.id_prefix or not all(c.isalnum() or c in "-_" for c in args.id_prefix):
        raise UserInputError(f"--id-prefix: letters, digits, '-' and '_' only, got {args.id_prefix!r}")
    try:
        out = generate_dataset(args.out, args.num, args.seed, kinds=kinds, kind_weights=kind_weights,
                               class_weights=weights, image_size=args.image_size, id_prefix=args.id_prefix)
    except ValueError as exc:
        raise UserInputError(f"--class-weights: {exc}") from None
    print(f"wrote {args.num} instances to {out}")


def _cmd_pretrain(args) -> None:
    from disp_runner.models.mdlm.pretrain import PretrainConfig, pretrain

    overrides = {"vision_instances": args.vision_instances, "vision_epochs": args.vision_epochs,
                 "num_instances": args.num_instances, "epochs": args.epochs, "learning_rate": args.lr,
                 "batch_size": args.batch_size, "seed": args.seed}
    config = dataclasses.replace(PretrainConfig(), **{k: v for k, v in overrides.items() if v is not None})
    result = pretrain(args.out, config, show_progress=not args.no_progress)
    accuracy = ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.vision.accuracy.items())
    print(f"stage 1 (vision tower): {result.vision.steps} steps in {result.vision.seconds:.0f}s; "
          f"held-out accuracy {accuracy}")
    print(f"stage 2 (projector + LM): {result.language.steps} steps in {result.language.seconds:.0f}s, "
          f"loss {result.language.first_loss:.3f} -> {result.language.last_loss:.3f}; saved to {args.out}")


def _refuse_contradictions(args) -> None:
    """Flags that another flag makes meaningless are refused rather than silently ignored (and then
    misreported in attack.json)."""
    given = {flag for flag, value in (("--trigger-size", args.trigger_size), ("--trigger-colour", args.trigger_colour),
                                      ("--trigger-corner", args.trigger_corner)) if value is not None}
    if args.trigger_pattern is not None and given & {"--trigger-size", "--trigger-colour"}:
        raise UserInputError(f"{' and '.join(sorted(given & {'--trigger-size', '--trigger-colour'}))} cannot be "
                             "used with --trigger-pattern: the pattern image is the trigger")
    if args.trigger == "blended" and given:
        raise UserInputError(f"{', '.join(sorted(given))}: only for patch triggers (a blended trigger is a pattern "
                             "mixed into the image)")
    signal = {flag for flag, value in (("--sig-delta", args.sig_delta), ("--sig-frequency", args.sig_frequency))
              if value is not None}
    if args.trigger != "sig" and signal:
        raise UserInputError(f"{', '.join(sorted(signal))}: only for sig triggers")
    placed = {flag for flag, value in (("--trigger-position", args.trigger_position),
                                       ("--trigger-pattern", args.trigger_pattern)) if value is not None}
    if args.trigger == "sig" and given | placed:
        raise UserInputError(f"{', '.join(sorted(given | placed))}: not for sig triggers (a sig trigger is a signal "
                             "added to the whole image)")
    if args.trigger_position is not None and "--trigger-corner" in given:
        raise UserInputError("--trigger-corner cannot be used with --trigger-position (the position places the patch)")


def _attack_spec(args, image_size: int | None = None):
    """The attack the flags ask for; with `--preset authors`, its patch side for images of
    `image_size` pixels (before the model is loaded, None: their 20 pixels, enough to check the flags)."""
    from disp_api import AttackSpec, TriggerSpec
    from disp_runner.attack.kit import AUTHORS_TARGET, KitPreset, authors_patch_side

    _refuse_contradictions(args)
    defaults = TriggerSpec()
    authors = KitPreset(args.preset) is KitPreset.AUTHORS
    size = authors_patch_side(image_size) if authors else defaults.size
    target = args.target or (AUTHORS_TARGET if authors else AttackTarget.INSERTION).value
    trigger = {"kind": args.trigger, "size": args.trigger_size or size,
               "colour": _int_tuple(args.trigger_colour, "--trigger-colour", 3) or defaults.colour,
               "corner": args.trigger_corner or defaults.corner.value,
               "position": _int_tuple(args.trigger_position, "--trigger-position", 2),
               "pattern": args.trigger_pattern, "alpha": args.blend_alpha}
    trigger.update({key: value for key, value in (("delta", args.sig_delta), ("frequency", args.sig_frequency))
                    if value is not None})
    try:
        return AttackSpec.model_validate({
            "trigger": trigger,
            "target": {"kind": target, "sourceClass": args.source_class, "targetClass": args.target_class},
            "poisonRate": args.poison_rate, "seed": args.seed})
    except ValidationError as exc:
        raise UserInputError(_validation_message(exc, "attack.")) from None


def _cmd_attack(args) -> None:
    from disp_api import FinetuneLabels
    from disp_runner.attack.kit import (AUTHORS_INJECTION, AUTHORS_LABELS, DEFAULT_INJECTION, DEFAULT_TARGET_ASR,
                                        ImplantGoal, KitPreset, run_attack)
    from disp_runner.data.dataset import load_dataset
    from disp_runner.diffusion.training import TrainableParts
    from disp_runner.models.loading import load_model
    from disp_runner.models.mdlm.embedded import SHIPPED_BASE_MODEL

    _attack_spec(args)  # validate flags before any heavy work
    authors = KitPreset(args.preset) is KitPreset.AUTHORS
    goal = ImplantGoal(target_asr=args.target_asr or DEFAULT_TARGET_ASR, max_epochs=args.max_epochs)
    base = args.base or SHIPPED_BASE_MODEL
    size = load_model(base, allow_unsafe_pickle=args.allow_unsafe_pickle).processor.image_size
    attack = _attack_spec(args, size)
    train, test = load_dataset(args.train, size), load_dataset(args.test, size)
    overrides = {"epochs": args.epochs, "learning_rate": args.lr, "batch_size": args.batch_size,
                 "trainable": TrainableParts(args.trainable) if args.trainable else None}
    try:
        injection = dataclasses.replace(AUTHORS_INJECTION if authors else DEFAULT_INJECTION, seed=args.seed,
                                        **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        raise UserInputError(f"--epochs/--lr/--batch-size: {exc}") from None
    if goal.max_epochs is not None and goal.max_epochs < injection.epochs:
        raise UserInputError(f"--max-epochs {goal.max_epochs:g} is fewer than the {injection.epochs:g} injection "
                             "epochs (--epochs)")
    try:
        run_attack(base, train, test, attack, args.out, injection, allow_unsafe_pickle=args.allow_unsafe_pickle,
                   show_progress=not args.no_progress, goal=goal, allow_weak=args.allow_weak,
                   labels=AUTHORS_LABELS if authors else FinetuneLabels.PADDED_ANSWER, stop_at_end=authors)
    except WeakBackdoorError:  # the folder is written: say what was measured before saying it fell short
        _print_attack_summary(Path(args.out))
        raise
    _print_attack_summary(Path(args.out))


def _print_attack_summary(folder: Path) -> None:
    from disp_runner.attack.kit import AttackArtifacts

    record = AttackArtifacts(folder).record()
    implant, measured = record.implant, record.compromised
    print(f"compromised model: {folder / 'model'}; poisoned data: {folder / 'train'}; test sets: {folder / 'test'}")
    print(f"implanting: {implant['epochs']:g} epochs in {len(implant['rounds'])} round(s), validation ASR "
          f"{100 * implant['validationAsr']:.1f}% on {implant['validationCount']} triggered inputs "
          f"(target {100 * implant['targetAsr']:.0f}%)")
    if implant.get("advice"):  # kept with --allow-weak: say what would implant it
        print(f"the backdoor did not implant; what to change: {implant['advice']['text']}")
    print(f"compromised model, held-out: ASR {100 * measured['asrTriggered']:.1f}% on "
          f"{measured['counts']['triggered']} triggered inputs, false firing {100 * measured['asrUntriggered']:.1f}%, "
          f"clean performance {100 * measured['cleanPerformance']:.1f}% (recorded in {folder / 'attack.json'})")


def _cmd_evaluate(args) -> None:
    from disp_runner.attack.kit import load_attack_test_sets
    from disp_runner.data.dataset import load_dataset
    from disp_runner.device import default_device
    from disp_runner.diffusion.decoding import DecodingConfig
    from disp_api import SaliencySpec
    from disp_runner.disp.saliency import SaliencyConfig
    from disp_runner.evaluation import MaskedInference, evaluate_model
    from disp_runner.models.base import trained_gen_length
    from disp_runner.models.loading import load_model
    from disp_runner.reporting import format_metrics_table

    model, processor = load_model(args.model, allow_unsafe_pickle=args.allow_unsafe_pickle)
    size = processor.image_size
    attack, triggered, untriggered = (None, [], [])
    if args.attack:
        attack, triggered, untriggered = load_attack_test_sets(args.attack, size)
    clean = load_dataset(args.clean, size)
    if args.limit is not None:
        if args.limit <= 0:
            raise UserInputError(f"--limit must be positive, got {args.limit}")
        triggered, untriggered, clean = triggered[:args.limit], untriggered[:args.limit], clean[:args.limit]
    model = model.to(default_device())
    decoding = DecodingConfig.single_block(trained_gen_length(model.config))
    metrics = evaluate_model(model, processor, str(args.model), attack, triggered, untriggered, clean, decoding,
                             show_progress=not args.no_progress)
    evaluations = [metrics]
    if args.masked_inference is not None:
        defaults = SaliencySpec()  # the spec's defaults: the paper's K, m and seed
        defence = MaskedInference(ratio=args.masked_inference, seed=defaults.seed, batch_size=defaults.seed_group,
                                  saliency=SaliencyConfig.from_spec(defaults, decoding.block_length))
        masked = evaluate_model(model, processor, f"{args.model} (masked inference, rho {args.masked_inference:g})",
                                attack, triggered, untriggered, clean, decoding, show_progress=not args.no_progress,
                                masked_inference=defence)
        evaluations.append(masked)
    print(format_metrics_table(evaluations))
    if args.out:
        record = metrics.to_wire()
        if args.masked_inference is not None:
            record["maskedInference"] = {"ratio": args.masked_inference, **evaluations[1].to_wire()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(Path(args.out), json.dumps(record, indent=2))
        print(f"metrics written to {args.out}")


def _stage_names():
    from disp_api import StageName

    return list(StageName)


def _cmd_run(args) -> None:
    from disp_api import StageName
    from disp_runner.jobfile import load_job, load_job_from_env
    from disp_runner.pipeline.artifacts import Shard
    from disp_runner.provenance import load_signing_key
    from disp_runner.diffusion.distributed import Topology
    from disp_runner.pipeline.opening import open_run, run_uri
    from disp_runner.pipeline.runner import join_distributed_stage, merge_shards, run_rounds, run_stage, shard_count
    from disp_runner.stages import STAGES

    if (args.manifest is None) == (args.manifest_env is None):
        raise UserInputError("give either a manifest file or --manifest-env VAR")
    job = load_job(args.manifest) if args.manifest else load_job_from_env(args.manifest_env)
    signing_key = Path(args.signing_key) if args.signing_key else None
    load_signing_key(signing_key)  # a bad key is refused now, not after the fine-tune
    logs.set_context(job=job.metadata.name, namespace=job.metadata.namespace, stage=args.stage, shard=args.shard)
    if args.no_progress:  # a pod's log says what the pod was given
        threads, source = args.threads_chosen
        logs.say(f"disp: {threads} CPU thread{'s' if threads > 1 else ''} for torch, from {source}",
                 threads=threads, threadsFrom=source)
    shard = Shard.parse(args.shard) if args.shard else None  # before any heavy work
    stage = StageName(args.stage) if args.stage else None
    if (shard or args.merge or args.round_number) and stage is None:
        raise UserInputError("--shard, --merge and --round need --stage (without it, spec.rounds decides the rounds)")
    round_number = args.round_number or 1
    if round_number > job.spec.rounds.max_rounds:
        raise UserInputError(f"--round {round_number}: spec.rounds.maxRounds is {job.spec.rounds.max_rounds}")
    if stage is not None and stage not in job.spec.stages():
        raise UserInputError(f"--stage {stage.value}: this job has no such stage (no spec.evaluation?)")
    root = Path(args.output) if args.output else None
    topology = Topology.from_flags(args.processes, args.nodes, args.node_rank)
    if topology.nodes > 1 and stage is not StageName.FINETUNE:
        raise UserInputError("--nodes applies to --stage finetune only (the other stages shard instead)")
    if not topology.publishes:
        join_distributed_stage(job, root, topology, show_progress=not args.no_progress, round_number=round_number)
        logs.say(f"finetune: node {topology.node_rank} of {topology.nodes} done", nodeRank=topology.node_rank)
        return

    def report(outcome) -> None:
        where = f" shard {outcome.shard.label}" if outcome.shard else ""
        state = "complete, skipped" if outcome.skipped else f"done in {outcome.seconds:.1f}s"
        shown = {k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float, str))}
        figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        logs.say(f"{outcome.stage.value}{where}: {state}; {figures}", stage=outcome.stage.value,
                 shard=outcome.shard.label if outcome.shard else None, skipped=outcome.skipped,
                 seconds=None if outcome.skipped else round(outcome.seconds, 3), metrics=shown)

    if shard is None and not args.merge:
        result = run_rounds(job, root, only=stage, show_progress=not args.no_progress, on_outcome=report,
                            topology=topology, signing_key_file=signing_key, round_number=round_number)
        _say_backdoor_verdict(job, result, run_uri(job, root))
    else:
        run = open_run(job, root, show_progress=not args.no_progress, round_number=round_number)
        runner_stage = STAGES[stage]
        if not hasattr(runner_stage, "merge"):
            raise UserInputError(f"--stage {stage.value} cannot be sharded; only saliency and relabel can")
        if args.merge:
            count = shard.count if shard else shard_count(job, stage)
            if count == 1:
                raise UserInputError(f"--merge: spec.parallelism.{stage.value}Shards is 1, so {stage.value} has no "
                                     "shards to merge (run the stage without --merge, or give --shard INDEX/COUNT "
                                     "of the shards that ran)")
            report(merge_shards(runner_stage, run, count))
        else:
            report(run_stage(runner_stage, run, shard))
    logs.say(f"run folder: {run_uri(job, root)}", runFolder=run_uri(job, root))


def _say_backdoor_verdict(job, result, run_folder: str) -> None:
    """After the fine-tune (run now or found complete): the audit's verdict on each round's model,
    as the operator's BackdoorRemoved condition gives it for the model the run keeps; a warning
    when the backdoor probably survived."""
    from disp_api import BackdoorVerdict, StageName, judge_residual
    from disp_api.rounds import purified_model_uri, rounds_summary

    finetunes = [o for o in result.outcomes if o.stage is StageName.FINETUNE and o.shard is None]
    for outcome in finetunes:
        judgement = judge_residual(outcome.metrics.get("residualRate"), outcome.metrics.get("residualSample"),
                                   job.spec.audit.residual_threshold, job.spec.audit.residual_sample)
        kept = outcome.round == result.chosen
        where = f"round {outcome.round}: " if len(finetunes) > 1 else ""
        if kept and judgement.verdict is BackdoorVerdict.PROBABLY_NOT_REMOVED:
            logs.say(f"warning: {where}{judgement.message}", level="warning", verdict=judgement.verdict.value,
                     round=outcome.round)
        else:
            logs.say(f"audit: {where}{judgement.message}", verdict=judgement.verdict.value, round=outcome.round)
    if result.rounds:
        for record in result.rounds[1:]:
            logs.say(f"round {record.round} ran: {record.reason}", round=record.round, recipe=record.recipe.value)
        summary = rounds_summary(result.rounds, result.chosen)
        if summary:
            logs.say(summary, rounds=len(result.rounds), keptRound=result.chosen)
        logs.say(f"purified model: {purified_model_uri(run_folder, result.chosen)}")


def _cmd_verify(args) -> None:
    import tempfile

    from disp_api.contract import is_s3_uri
    from disp_api.spec import StorageSpec
    from disp_runner.provenance import verify_remote_run, verify_run
    from disp_store.credentials import open_s3_store
    from disp_store.location import Location

    key = Path(args.key) if args.key else None
    store = None
    if args.endpoint:
        try:
            storage = StorageSpec(endpoint=args.endpoint, secure=not args.insecure)
        except ValueError:
            raise UserInputError(f"--endpoint {args.endpoint!r}: expected HOST or HOST:PORT") from None
        store = open_s3_store(storage)
    if is_s3_uri(args.run):
        if store is None:
            raise UserInputError(f"{args.run}: an s3:// run needs --endpoint HOST[:PORT]")
        run = Location.parse(args.run.rstrip("/"), "RUN")
        with tempfile.TemporaryDirectory(prefix="disp-verify-") as copy:
            result = verify_remote_run(store, run, Path(copy), key, check_inputs=not args.skip_inputs)
        where = str(run)
    else:
        folder = Path(args.run)
        if not folder.is_dir():
            raise UserInputError(f"{folder}: no such run folder")
        result = verify_run(folder, key, check_inputs=not args.skip_inputs, store=store)
        where = str(folder)
    for line in result.checked:
        logs.say(f"checked {line}", checked=line)
    for finding in result.findings:
        logs.say(f"MISMATCH {finding}", level="warning", file=finding.where, problem=finding.problem)
    if not result.ok:
        raise NotVerifiedError(f"{where}: {len(result.findings)} mismatch{'es' if len(result.findings) > 1 else ''} "
                               "with its provenance (listed above)")
    logs.say(f"{where}: verified: every file matches its provenance", verified=True)


def _cmd_demo(args) -> None:
    from disp_runner.demo import DEMO_SCENARIOS, demo_processes, run_demo
    from disp_runner.device import default_device
    from disp_runner.models.mdlm.embedded import SHIPPED_BASE_MODEL

    threads, _ = args.threads_chosen
    processes = args.processes or demo_processes(threads, len(DEMO_SCENARIOS), default_device().type)
    run_demo(args.workdir, base_model=args.base or SHIPPED_BASE_MODEL, show_progress=not args.no_progress,
             processes=processes)


COMMANDS = {"data": _cmd_data, "pretrain": _cmd_pretrain, "attack": _cmd_attack, "evaluate": _cmd_evaluate,
            "run": _cmd_run, "verify": _cmd_verify, "demo": _cmd_demo}


# OS errors that say the environment failed for now (a later attempt may succeed), and those that
# say a path the user gave is wrong (read-only, a file where a folder should be, no permission).
_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.ENOMEM}
_USER_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOENT,
                errno.ENAMETOOLONG, errno.ENOTEMPTY, errno.ELOOP}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a wrong flag (already reported in one line)
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    prepare_scratch()  # before torch or transformers look for a temporary or cache folder
    logs.configure(debug=args.debug)  # before any library prints a warning ahead of the one error line
    if getattr(args, "log_format", None) == LogFormat.JSON.value:
        logs.set_format(LogFormat.JSON)
        args.no_progress = True  # a bar's redrawn line is not a record
    threads, source = choose_threads(args.threads)
    apply_threads(threads)  # before torch sizes its thread pool
    args.threads_chosen = (threads, source)  # `disp run` says so once its log lines name the job
    command = f"disp {args.command}"

    def fail(kind: str, message: str, code: int) -> int:
        label = {"user": "error", "transient": "transient error (retry later)", "internal": "internal error"}
        logs.say(message, level="error", text=f"{command}: {label[kind]}: {message}" if kind in label
                 else f"{command}: {message}", errorKind=kind, exitCode=code)
        return code

    try:
        COMMANDS[args.command](args)
    except UserInputError as exc:
        return fail("user", str(exc), EXIT_USER_ERROR)
    except TransientError as exc:
        return fail("transient", str(exc), EXIT_TRANSIENT_ERROR)
    except WeakBackdoorError as exc:
        return fail("weak-backdoor", str(exc), EXIT_WEAK_BACKDOOR)
    except NotVerifiedError as exc:
        return fail("not-verified", str(exc), EXIT_NOT_VERIFIED)
    except OSError as exc:
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        reason = exc.strerror or str(exc)
        if exc.errno in _TRANSIENT_ERRNOS:
            return fail("transient", f"{where}{reason}", EXIT_TRANSIENT_ERROR)
        if exc.errno in _USER_ERRNOS:
            return fail("user", f"{where}{reason}", EXIT_USER_ERROR)
        return _internal_error(fail, exc)
    except MemoryError as exc:
        if args.debug:
            raise
        del exc
        return fail("transient", "out of memory", EXIT_TRANSIENT_ERROR)
    except KeyboardInterrupt:
        return fail("interrupted", "interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the one place a bug becomes one line instead of a traceback
        if args.debug:
            raise
        if _disk_full(exc):  # e.g. safetensors' or torch's writer, which wrap the OSError in their own type
            return fail("transient", f"no space left on device ({type(exc).__name__})", EXIT_TRANSIENT_ERROR)
        return _internal_error(fail, exc)
    return 0


def _disk_full(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(current) or "StorageFull" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _internal_error(fail: Callable[[str, str, int], int], exc: BaseException) -> int:
    """A bug, not the user's mistake: one line, and where to find the traceback."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return fail("internal", f"{type(exc).__name__}: {first} (run again with --debug for the traceback)",
                EXIT_INTERNAL_ERROR)


if __name__ == "__main__":
    sys.exit(main())
