"""The PurificationJob: one manifest, read by the operator (as a custom resource) and by the runner
(`disp run FILE.yaml`). Every default is the method's (the DiSP paper, arXiv 2602.22246, and its authors' code): K = 5,
m = 6 probes, ρ = 0.3, decoding 32/32/32 at temperature 0 with seed 1234, fine-tuning of the
projector only at lr 1e-4, cosine, 3% warmup, no weight decay, 4 epochs, batch 32."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, Field, StringConstraints, field_validator, model_validator

from disp_api.attack import AttackSpec
from disp_api.base import ContractModel, Seed, with_cel_rules
from disp_api.contract import uri_problem

API_GROUP = "disp.dev"
API_VERSION = "v1alpha1"
KIND = "PurificationJob"

# The purified model's folder inside a run (the finetune stage's output), in Hugging Face format.
PURIFIED_MODEL_PATH = "finetune/model"

# RFC 1123 DNS label, as Kubernetes requires of names that become Job and label values.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# A uid becomes the last folder (and S3 prefix part) of a run: Kubernetes' are UUIDs; any id made of
# letters, digits, '-' and '_' is accepted, nothing that could name another folder.
_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


class StageName(str, Enum):
    """The DiSP stages, in the order they run."""

    SALIENCY = "saliency"
    MASKING = "masking"
    RELABEL = "relabel"
    FINETUNE = "finetune"
    EVALUATE = "evaluate"


class LogFormat(str, Enum):
    """How `disp run` writes its log: lines for people, or one JSON object per line for a log
    pipeline (the operator passes its chart's choice to every stage pod)."""

    TEXT = "text"
    JSON = "json"


class TrainableParts(str, Enum):
    """Which weights a fine-tune updates."""

    PROJECTOR = "projector"  # the paper's choice for both backdoor injection and DiSP repair
    PROJECTOR_AND_LM = "projector-and-lm"  # everything but the (frozen) vision encoder
    ALL = "all"


# Every string, list and map of the spec is bounded: the API server estimates each CEL rule's worst
# cost from these bounds and refuses a CRD whose rules could exceed its budget.
MAX_URI = 4096  # a URI or path
MAX_NAME = 253  # a Kubernetes object name or a DNS subdomain
MAX_QUANTITY = 64  # a resource quantity such as 32Gi
MAX_LABEL_VALUE = 63  # Kubernetes' own limit on a label value
MAX_ANNOTATION_VALUE = 4096
MAX_MAP_ENTRIES = 64  # labels, annotations, node selectors
MAX_LIST_ITEMS = 32  # tolerations, image pull secrets
LabelValue = Annotated[str, StringConstraints(max_length=MAX_LABEL_VALUE)]
AnnotationValue = Annotated[str, StringConstraints(max_length=MAX_ANNOTATION_VALUE)]


def _safe_uri(uri: str) -> str:
    problem = uri_problem(uri)
    if problem is not None:
        raise ValueError(f"{uri[:200]!r} {problem}")
    return uri


# Every input and output location: a local path, file:// or s3://BUCKET/PREFIX, refused here (so by
# the operator and `disp run` alike) when it could leave its folder or relies on a shell's expansion.
Uri = Annotated[str, Field(min_length=1, max_length=MAX_URI), AfterValidator(_safe_uri)]
# Every URI field of the spec, as paths under spec on the wire: what the operator requires on S3
# (and the CRD's CEL rules say so) and what a stage may read (PurificationJobSpec.uris).
URI_FIELDS = ("model.uri", "model.projectorUri", "dataset.uri", "output.uri", "evaluation.triggeredUri",
              "evaluation.untriggeredUri", "evaluation.cleanUri", "evaluation.attackUri")


class ModelSource(ContractModel):
    uri: Uri
    """The compromised model: a folder (local path, file:// or s3://) in Hugging Face format."""
    allow_unsafe_pickle: bool = False
    """Opt in to loading pickle (.bin/.pt) weights. Pickle runs code on load: only for models you trust."""
    projector_uri: Optional[Uri] = None
    """A projector file to load over the model's own (the authors' workflow: base model + the
    backdoored mm_projector): safetensors, or a pickle .bin only with allowUnsafePickle; keys are
    the model's parameter names (model.mm_projector.* for LLaDA-V)."""


class DatasetSource(ContractModel):
    uri: Uri
    """The training set to purify: manifest.jsonl + images/, or a LLaVA conversations JSON + its images (local path, file:// or s3://)."""


class OutputSpec(ContractModel):
    uri: Uri
    """Where stage outputs go; each run writes under <uri>/runs/<namespace>/<name>/<uid>/."""


class SecretKeyRef(ContractModel):
    name: str = Field(min_length=1, max_length=MAX_NAME)
    """Name of the Kubernetes Secret in the job's namespace."""
    access_key_key: str = Field("accessKey", min_length=1, max_length=MAX_NAME)
    """Key in the Secret that holds the access key."""
    secret_key_key: str = Field("secretKey", min_length=1, max_length=MAX_NAME)
    """Key in the Secret that holds the secret key."""


class SecretKeySelector(ContractModel):
    name: str = Field(min_length=1, max_length=MAX_NAME)
    """Name of the Kubernetes Secret in the job's namespace."""
    key: str = Field("signingKey", min_length=1, max_length=MAX_NAME)
    """Key in the Secret that holds the value."""


class ProvenanceSpec(ContractModel):
    signing_key_secret: Optional[SecretKeySelector] = None
    """A Secret key holding an Ed25519 private key in PEM (openssl genpkey -algorithm ed25519): the
    runner signs the run's provenance.json with it (provenance.sig.json, a DSSE envelope), which
    `disp verify RUN --key PUBLIC.pem` checks. Unset: provenance.json is written unsigned."""


class StorageSpec(ContractModel):
    endpoint: Optional[str] = Field(None, min_length=1, max_length=253,
                                    pattern=r"^([A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$")
    """S3/MinIO endpoint host[:port] for s3:// URIs, e.g. minio.minio.svc:9000 (no scheme or path: secure chooses TLS)."""
    secure: bool = True
    """Use TLS to reach the endpoint."""
    region: Optional[str] = Field(None, min_length=1, max_length=MAX_QUANTITY)
    """Bucket region, when the server needs one."""
    credentials_secret: Optional[SecretKeyRef] = None
    """Secret holding the access and secret keys (never the keys themselves)."""


class DecodingCache(str, Enum):
    """What a decoding step recomputes. Exact decoding runs every step over the whole sequence; a
    cache computes the keys and values of the positions a step does not un-mask once, when the
    block starts (and every `cacheRefreshSteps` steps), and runs the other steps over fewer
    positions: the approximation Fast-dLLM's caches make for bidirectional diffusion LMs, since
    the cached positions no longer see the answer's later tokens."""

    NONE = "none"  # exact: every step is a full forward pass
    PREFIX = "prefix"  # the prompt (and earlier blocks) cached; a step runs over the current and later blocks
    DUAL = "dual"  # the later blocks cached too; a step runs over the current block only


def decoding_problem(gen_length: int | None, block_length: int | None, steps: int | None,
                     cached: bool, cache_refresh_steps: int | None) -> str | None:
    """The decoding rules, once: what is wrong with these settings (None: nothing). What is not
    given (None) is not checked: the spec checks what a manifest says, the runner the settings once
    the model has filled in the rest; the CRD's CEL rules above say the same for the API server."""
    if gen_length is not None and block_length is not None:
        if gen_length % block_length:
            return f"genLength {gen_length} must be a multiple of blockLength {block_length}"
        blocks = gen_length // block_length
        if steps is not None and steps % blocks:
            return f"steps {steps} must be a multiple of the number of blocks {blocks}"
    if cache_refresh_steps is not None and not cached:
        return "cacheRefreshSteps needs cache prefix or dual"
    return None


class DecodingSpec(ContractModel):
    model_config = with_cel_rules(
        ("!has(self.cacheRefreshSteps) || (has(self.cache) && self.cache != 'none')",
         "cacheRefreshSteps needs cache prefix or dual"),
        ("!has(self.genLength) || !has(self.blockLength) || self.genLength % self.blockLength == 0",
         "genLength must be a multiple of blockLength"),
        ("!has(self.genLength) || !has(self.blockLength) || !has(self.steps) || self.genLength % self.blockLength != 0"
         " || self.steps % (self.genLength / self.blockLength) == 0",
         "steps must be a multiple of the number of blocks (genLength / blockLength)"))

    steps: Optional[int] = Field(None, ge=1, le=4096)
    """Diffusion decoding steps in all (default: one per generated position, the authors' proportion)."""
    gen_length: Optional[int] = Field(None, ge=1, le=4096)
    """Response positions generated ([MASK]s appended to the prompt); default: the model's own (config gen_length), else 32."""
    block_length: Optional[int] = Field(None, ge=1, le=4096)
    """Semi-autoregressive block size; gen_length must be a multiple of it (default: gen_length, one block)."""
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    """0 = argmax; otherwise Gumbel-max sampling."""
    cache: DecodingCache = DecodingCache.NONE
    """none (exact, the default): every step is a full forward pass. prefix: the prompt's keys and
    values are computed once per block and each step runs over the answer only, many times faster
    on a long prompt (an image of thousands of visual tokens) at a small loss of agreement with
    exact decoding (docs/method.md, "Prompt-cache decoding"). dual: the later blocks are cached too."""
    cache_refresh_steps: Optional[int] = Field(None, ge=1, le=4096)
    """With a cache: recompute it every this many steps within a block (default: once, when the block starts)."""
    stop_at_end: bool = False
    """The authors' decoder: once a position commits the answer's end marker (<|eot_id|> for
    LLaDA-V, the end token for the embedded model), only positions before it are unmasked, and
    decoding ends when they are filled. Off (the default): every position is decoded and the answer
    cut at its first end marker; the unmasking order, and so the answers, can differ."""

    @model_validator(mode="after")
    def _check_blocks(self) -> "DecodingSpec":
        # Only what is given can be checked here; the rest comes from the model (DecodingConfig.for_model).
        problem = decoding_problem(self.gen_length, self.block_length, self.steps, self.cache is not DecodingCache.NONE,
                                   self.cache_refresh_steps)
        if problem:
            raise ValueError(problem)
        return self


# The batch sizes before `auto`: the groups random draws are made for when batchSize is unset, so
# results stay those of the fixed defaults whatever batch a device computes in.
DEFAULT_SALIENCY_GROUP, DEFAULT_RELABEL_GROUP = 16, 64


class ProbeDraws(str, Enum):
    """Which random draws the Hutchinson probes of each instance use."""

    INDEPENDENT = "independent"  # fresh draws per batch (seeded by its position), so instances differ
    SHARED = "shared"  # the authors': the generator is reseeded for every instance, so all share one set


class SaliencySpec(ContractModel):
    top_k: int = Field(5, ge=2)
    """Logits per position that enter the softmax Fisher (K); at least 2, at most the vocabulary."""
    probes: int = Field(6, ge=1, le=1024)
    """Hutchinson probes per instance (m)."""
    batch_size: Optional[int] = Field(None, ge=1, le=65536)
    """Instances per forward pass. Unset (auto): on a GPU the largest batch the memory planner fits
    on it (at most 256), on a CPU 16. Probes are drawn per group of batchSize instances (16 when
    unset), whatever batch computes them, so the batch a device picks never changes the scores; a
    group is also the unit a shard is made of."""
    seed: Seed = 0
    """Seed of the Hutchinson probes."""
    probe_draws: ProbeDraws = ProbeDraws.INDEPENDENT
    """independent: each batch draws its own probes (seeded by its position, so a shard scores
    what the whole run does). shared (the authors'): every instance is scored with the same draws,
    as their code reseeds before each instance; the estimator's noise is then the same for all."""
    region_size: int = Field(1, ge=1, le=16)
    """w: 1 scores each visual token by the paper's Fisher–Jacobian quadratic form. w ≥ 2 (beyond the
    paper, opt-in) also scores every w x w window of tokens by the exact KL of masking it whole, and a
    token takes the larger of its own score and any window's, so a trigger straddling token borders is
    found whole; it also finds whole objects in clean images, which lowers clean performance (docs/results.md,
    "Triggers anywhere"). Costs (rows-w+1)·(cols-w+1) extra forward passes, without gradients, per batch."""

    @property
    def seed_group(self) -> int:
        """Instances whose probes one generator draws (and the unit a shard is made of)."""
        return self.batch_size or DEFAULT_SALIENCY_GROUP


class MaskingSpace(str, Enum):
    """Where relabel masks the salient tokens."""

    TOKENS = "tokens"  # the paper: their visual tokens are replaced by e_MASK after the projector
    PIXELS = "pixels"  # their image cells are painted over before the vision tower sees the image


class MaskingFill(str, Enum):
    """What the painted cells show, with masking.space: pixels."""

    BORDER = "border"  # the median colour of the image's border (the scene's background, where it has one)
    INPAINT = "inpaint"  # drawn in from the surrounding pixels (Telea's fast marching, OpenCV's inpaint)


class MaskingSpec(ContractModel):
    model_config = with_cel_rules(
        ("!has(self.fill) || self.fill != 'inpaint' || (has(self.space) && self.space == 'pixels')",
         "fill: inpaint paints image cells, so it needs space: pixels"))

    ratio: float = Field(0.3, gt=0.0, le=1.0)
    """ρ: the top ⌊ρ·T_img⌋ most salient visual tokens of each instance are masked."""
    space: MaskingSpace = MaskingSpace.TOKENS
    """tokens (the paper): the masked visual tokens are replaced by e_MASK. pixels (beyond the paper,
    opt-in): relabel sees the image with those tokens' cells painted in the image's border colour
    instead, so the vision tower never sees what they showed: its attention spreads a trigger's
    evidence into neighbouring tokens, which token masking leaves in place (docs/results.md, "Triggers
    anywhere"). The audit still masks tokens."""
    fill: MaskingFill = MaskingFill.BORDER
    """With space: pixels, what the painted cells show. border: the image's border colour, which
    erases whatever the cells showed, an object's part included. inpaint: the cells drawn in from
    the pixels around them, so a trigger over an object is replaced by the object's surface rather
    than by background (docs/results.md gives the measured effect)."""

    @model_validator(mode="after")
    def _fill_paints_pixels(self) -> "MaskingSpec":
        if self.fill is MaskingFill.INPAINT and self.space is not MaskingSpace.PIXELS:
            raise ValueError("fill: inpaint paints image cells, so it needs space: pixels")
        return self
    blur_sigma: Optional[float] = Field(None, gt=0.0, le=64.0)
    """Beyond the paper, opt-in: relabel also sees the image blurred (Gaussian, this σ in pixels of
    the stored image), which neutralises whole-image triggers made of fine noise (Blended keys) that
    masking tokens leaves intact. The relabels of clean images lose detail, so clean performance
    drops; docs/results.md gives the measured trade-off."""


class RelabelScope(str, Enum):
    """Which training instances get the compromised model's masked answer."""

    ALL = "all"  # the paper: every instance is relabelled
    SUSPECTS = "suspects"  # only the audit's suspects; the others keep the dataset's answer


class RelabelAcceptance(str, Enum):
    """Which changed answers replace the dataset's."""

    ALL = "all"  # the paper: every relabel answer
    SIGNATURE = "signature"  # only those that remove the backdoor's answer signature


class EmptyAnswers(str, Enum):
    """What becomes of an instance the compromised model answers with nothing once masked."""

    DROP = "drop"  # left out of the purified dataset (and counted): an empty target teaches no answer
    KEEP = "keep"  # the authors': the empty answer replaces the dataset's, and the fine-tune trains on it


class RelabelSpec(ContractModel):
    decoding: DecodingSpec = DecodingSpec()
    """How the compromised model answers the masked instances; also sets the saliency block. Left out,
    steps, genLength and blockLength come from the model (the embedded model: 16/16/16; a model without
    a generation length of its own: the authors' 32/32/32)."""
    prompt: Optional[str] = Field(None, min_length=1, max_length=MAX_ANNOTATION_VALUE)
    """A fixed prompt for every instance (the authors: "Describe this image in detail."), which saliency scores the tokens for too; default: each instance's own."""
    batch_size: Optional[int] = Field(None, ge=1, le=65536)
    """Instances decoded together. Unset (auto): on a GPU the largest batch the memory planner fits
    on it (at most 256), on a CPU 64; with temperature > 0 always 64, the group its noise is drawn
    for, so the answers never depend on the device. Also the unit a shard is made of (64 when unset)."""
    seed: Seed = 1234
    """Seed of the decoding noise (used when temperature > 0)."""
    scope: RelabelScope = RelabelScope.ALL
    """all (the paper): every instance gets the masked answer. suspects (beyond the paper, opt-in):
    only the audit's suspects do, and only they are decoded; the others keep the dataset's answer,
    which protects clean performance when the audit finds the poisoned instances (docs/method.md,
    "Audit evidence")."""
    acceptance: RelabelAcceptance = RelabelAcceptance.ALL
    """all (the paper): every relabel answer replaces the dataset's. signature (beyond the paper,
    opt-in): a changed answer is kept only when it removes a word that relabel removes from at least
    half of the dataset answers containing it (the backdoor's inserted token, refusal sentence or
    target class); the other changes, mostly guesses on clean images whose object was masked, are
    put back, which protects clean performance (docs/results.md, "Triggers anywhere")."""
    min_evidence: Optional[float] = Field(None, ge=0.0, le=10_000.0)
    """Beyond the paper, opt-in: replace an instance's answer only when the compromised model, shown
    the masked input, finds the new answer more likely than the dataset's by at least this many nats
    (first-step log-likelihood of the whole answer); otherwise the dataset's answer is kept. A masked
    clean image often loses its object and gets a guessed answer the model is unsure of, while a
    neutralised trigger leaves the rest of the image and a confident answer. Unset: the paper's
    behaviour, every answer is replaced."""
    empty_answers: EmptyAnswers = EmptyAnswers.DROP
    """drop: an instance whose relabel answer is empty is left out of the purified dataset (counted
    as emptyResponses). keep (the authors'): the empty answer replaces the dataset's, so the
    fine-tune teaches the model to end its answer at once on that image."""

    @property
    def seed_group(self) -> int:
        """Instances whose decoding noise one generator draws (and the unit a shard is made of)."""
        return self.batch_size or DEFAULT_RELABEL_GROUP


class FinetuneLabels(str, Enum):
    """Which tokens of a training row the fine-tune's loss supervises."""

    # This project's: the answer padded with the end token to genLength, loss over those positions.
    PADDED_ANSWER = "padded-answer"
    # The authors' (LLaDA-V's SFT labelling): the whole answer turn — its header, the answer and its
    # end-of-turn marker — plus every chat-format marker in the prompt; no padding; loss divided by
    # the number of supervised tokens.
    CHAT_TURNS = "chat-turns"


class FinetuneSharding(str, Enum):
    """How the processes of a multi-GPU fine-tune hold the model."""

    NONE = "none"  # each holds all of it, its gradients and optimiser state (DDP)
    FSDP = "fsdp"  # parameters, gradients and optimiser state split among them (fully sharded data parallel)


class FinetuneSpec(ContractModel):
    epochs: float = Field(4.0, gt=0.0, le=1000.0)
    """Passes over the purified dataset (rule of thumb: 1/5 to 1/10 of the injection's)."""
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0)
    """Peak learning rate of the cosine schedule."""
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    """Fraction of the steps spent warming up."""
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    """AdamW weight decay."""
    batch_size: int = Field(32, ge=1, le=65536)
    """Effective batch size."""
    trainable: TrainableParts = TrainableParts.PROJECTOR
    """Which weights are updated."""
    seed: Seed = 0
    """Seed of data order and diffusion noise."""
    projector_file: bool = False
    """Also write the purified projector alone (finetune/projector.safetensors, keyed by parameter
    name), beside the complete model folder."""
    group_by_length: bool = False
    """Batches of rows of similar lengths (groups of 16 batches sorted by length, the batches
    shuffled; LLaVA's group_by_modality_length): far less padding when image sizes, and so visual
    token counts, vary. Off: every batch a random draw."""
    labels: FinetuneLabels = FinetuneLabels.PADDED_ANSWER
    """padded-answer: the answer padded with the end token to genLength is supervised (the model
    learns where answers end as decoding sees them), loss divided by genLength. chat-turns (the
    authors'): the answer's whole turn (header, answer, end-of-turn) and the chat format's markers
    in the prompt are supervised, unpadded, loss divided by their number; for a family without a
    chat format, the answer and one end token."""
    activation_checkpointing: bool = False
    """Keep only each language-model layer's input for the backward and recompute the rest layer by
    layer (about one more forward of compute): the fine-tune's activation memory drops from every
    layer's to one layer's, so a batch several times larger fits. For model families that support
    it (LLaDA-V does); refused otherwise."""
    sharding: FinetuneSharding = FinetuneSharding.NONE
    """With several processes (GPUs): none (the default) keeps a whole copy of the model, its
    gradients and its optimiser state in every process. fsdp splits all three among the processes,
    each layer gathered only while it computes: for a fine-tune whose trainable part (trainable:
    projector-and-lm or all) and AdamW state do not fit one GPU. Same global batch, schedule and
    results as one process; one process ignores it."""


class AuditSpec(ContractModel):
    suspicion_threshold: float = Field(3.0, gt=0.0, le=1000.0)
    """Support drop (nats) above which a training instance is a suspect: masking its most salient
    visual tokens costs the dataset's answer this much more log-likelihood than masking as many
    other tokens (3 nats: the answer becomes 20 times less likely)."""
    residual_sample: int = Field(64, ge=0, le=100_000)
    """Top suspects the purified model answers, unmasked, for the residual rate (0: none)."""
    residual_threshold: float = Field(0.05, ge=0.0, le=1.0)
    """Residual rate above which the job reports that the backdoor was probably not removed: the
    BackdoorRemoved condition turns False, a Warning Event (BackdoorNotRemoved) is posted and
    `disp run` says so. The default matches the chart's residual-rate alert."""
    seed: Seed = 0
    """Seed of the comparison tokens (as many as the salient ones, drawn from the others)."""


# The first round and the escalation ladder's recipes (disp_api.rounds.ESCALATIONS).
MAX_ROUNDS = 3


class RoundPolicy(str, Enum):
    """Whether the run purifies again when its own audit says the backdoor survived."""

    CLOSED_LOOP = "closed-loop"  # beyond the paper: escalate round by round while the residual rate is too high
    SINGLE_PASS = "single-pass"  # the paper: one round, whatever the audit finds


class RoundsSpec(ContractModel):
    policy: RoundPolicy = RoundPolicy.CLOSED_LOOP
    """closed-loop (beyond the paper, the default): after each round's fine-tune the audit's residual
    rate decides; above audit.residualThreshold the run purifies the compromised model again with the
    next recipe of the escalation ladder (round 2: region saliency, pixel masking and signature
    acceptance, for triggers that straddle tokens or lie over the object; round 3: the blurred
    relabel, for whole-image keys) until a round's residual rate is at most the threshold or
    maxRounds ran. single-pass (the paper): one round with the spec's settings."""
    max_rounds: int = Field(MAX_ROUNDS, ge=1, le=MAX_ROUNDS)
    """Rounds at most, the first included (1 is the single pass)."""


class MaskedInferenceSpec(ContractModel):
    """The DiSP authors' test-time defence, measured beside DiSP: the compromised model answers each
    evaluation input with the top ⌊ρ·T⌋ most salient visual tokens of that input replaced by e_MASK
    (saliency as spec.saliency scores it, on the input's own prompt), with no fine-tune. Every
    evaluation input then costs a saliency pass (1 forward + `probes` backward passes) on top of
    decoding."""

    ratio: float = Field(0.3, gt=0.0, le=1.0)
    """ρ at inference (the authors' generate(mask_infer=True, mask_ratio=0.3))."""


# The attack kit's record of an attack folder (`disp attack`), which evaluation.attackUri may name.
ATTACK_MANIFEST = "attack.json"


class EvaluationSpec(ContractModel):
    model_config = with_cel_rules(
        ("has(self.attack) != has(self.attackUri)",
         "give either attack (trigger and target) or attackUri (an attack folder), not both"))

    attack: Optional[AttackSpec] = None
    """The suspected trigger and target (target.kind is required: it decides the ASR rule); or give attackUri."""
    attack_uri: Optional[Uri] = None
    """Instead of attack: an attack folder written by `disp attack`, or its attack.json (local path or s3://)."""
    triggered_uri: Uri
    """Held-out inputs carrying the trigger (ASR)."""
    untriggered_uri: Optional[Uri] = None
    """The same inputs without the trigger (false firing)."""
    clean_uri: Optional[Uri] = None
    """Held-out clean instances with metadata.answer_keys (clean performance)."""
    decoding: Optional[DecodingSpec] = None
    """Decoding used to answer the evaluation inputs (default: spec.relabel.decoding)."""
    max_instances: Optional[int] = Field(None, ge=1)
    """Use at most this many instances of each evaluation set."""
    masked_inference: Optional[MaskedInferenceSpec] = None
    """Also evaluate the authors' test-time defence (the compromised model answering with its most
    salient visual tokens masked), reported as metrics.json maskedInference beside DiSP's result."""

    @model_validator(mode="after")
    def _one_attack(self) -> "EvaluationSpec":
        if (self.attack is None) == (self.attack_uri is None):
            raise ValueError("give either attack (trigger and target) or attackUri (an attack folder), not both")
        # A default target kind would silently choose the ASR rule (insertion's) for the user.
        if self.attack is not None and ("target" not in self.attack.model_fields_set
                                        or "kind" not in self.attack.target.model_fields_set):
            raise ValueError("attack.target.kind is required: it decides the ASR rule "
                             "(insertion, refusal or misclassification)")
        return self


MAX_FINETUNE_NODES = 64


class ParallelismSpec(ContractModel):
    saliency_shards: int = Field(1, ge=1, le=1024)
    """Pods the saliency stage is split over (an Indexed Job in the cluster)."""
    relabel_shards: int = Field(1, ge=1, le=1024)
    """Pods the relabel stage is split over."""
    finetune_nodes: int = Field(1, ge=1, le=MAX_FINETUNE_NODES)
    """Pods (nodes) the fine-tune spans, each running one process per GPU it gets: an Indexed Job
    whose pods meet through a headless Service; the global batch and results stay those of one
    process."""


class PullPolicy(str, Enum):
    """Kubernetes imagePullPolicy of the runner pods."""

    ALWAYS = "Always"
    IF_NOT_PRESENT = "IfNotPresent"
    NEVER = "Never"


class TolerationOperator(str, Enum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(str, Enum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(ContractModel):
    key: Optional[str] = Field(None, max_length=MAX_NAME + 1 + MAX_LABEL_VALUE)
    """Taint key the toleration matches; empty with operator Exists matches every taint."""
    operator: TolerationOperator = TolerationOperator.EQUAL
    """Exists or Equal."""
    value: Optional[str] = Field(None, max_length=MAX_LABEL_VALUE)
    """Taint value to match (operator Equal)."""
    effect: Optional[TaintEffect] = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: Optional[int] = Field(None, ge=0)
    """How long a NoExecute taint is tolerated before eviction."""


# Kubernetes quantities such as 500m, 2, 16Gi, 1.5G (the API server re-checks them).
_QUANTITY = r"^([0-9]+(\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


class StageResources(ContractModel):
    """One stage's pods, where they differ from spec.resources (unset fields: spec.resources')."""

    gpus: Optional[int] = Field(None, ge=0, le=64)
    """GPUs per pod; the fine-tune starts one process per GPU."""
    cpu: Optional[str] = Field(None, pattern=_QUANTITY, max_length=MAX_QUANTITY)
    """CPU request and limit per pod."""
    memory: Optional[str] = Field(None, pattern=_QUANTITY, max_length=MAX_QUANTITY)
    """Memory request and limit per pod."""
    scratch: Optional[str] = Field(None, pattern=_QUANTITY, max_length=MAX_QUANTITY)
    """Size limit of the pod's scratch volume."""


class PerStageResources(ContractModel):
    saliency: Optional[StageResources] = None
    """Saliency pods (a forward and backward pass per probe: a GPU stage)."""
    masking: Optional[StageResources] = None
    """Masking pods. Default: no GPU (it ranks scores already computed)."""
    relabel: Optional[StageResources] = None
    """Relabel pods (diffusion decoding: a GPU stage)."""
    finetune: Optional[StageResources] = None
    """Fine-tune pods; with several GPUs, one training process per GPU."""
    evaluate: Optional[StageResources] = None
    """Evaluation pods."""


# Stages that get no GPU unless spec.resources.stages says otherwise.
CPU_STAGES = frozenset({StageName.MASKING})


@dataclass(frozen=True)
class StageRequest:
    """What one stage's pods request, after per-stage settings and defaults are applied."""

    gpus: int
    cpu: str
    memory: str
    scratch: str


class ResourcesSpec(ContractModel):
    gpus: Optional[int] = Field(None, ge=0, le=64)
    """GPUs per runner pod (nvidia.com/gpu); 0 runs the stages on CPU. Default: the operator's (1);
    masking gets none unless stages.masking.gpus says so."""
    cpu: str = Field("4", pattern=_QUANTITY, max_length=MAX_QUANTITY)
    """CPU request and limit per pod (a Kubernetes quantity)."""
    memory: str = Field("32Gi", pattern=_QUANTITY, max_length=MAX_QUANTITY)
    """Memory request and limit per pod (a Kubernetes quantity)."""
    scratch: str = Field("50Gi", pattern=_QUANTITY, max_length=MAX_QUANTITY)
    """Size limit of the pod's writable scratch volume (models and datasets are materialised there)."""
    stages: PerStageResources = PerStageResources()
    """Per-stage overrides of gpus, cpu, memory and scratch (e.g. several GPUs for the fine-tune)."""
    node_selector: Optional[dict[str, LabelValue]] = Field(None, max_length=MAX_MAP_ENTRIES)
    """Node labels the runner pods must match, e.g. nvidia.com/gpu.product: H100-SXM. Default: the
    operator's."""
    tolerations: Optional[list[Toleration]] = Field(None, max_length=MAX_LIST_ITEMS)
    """Taints the runner pods tolerate (GPU nodes are often tainted). Default: the operator's."""
    priority_class_name: Optional[str] = Field(None, min_length=1, max_length=MAX_NAME)
    """PriorityClass of the runner pods. Default: the operator's, if any."""
    image: Optional[Uri] = None
    """Runner image; default: the one the operator is configured with."""
    image_pull_policy: PullPolicy = PullPolicy.IF_NOT_PRESENT
    """When the kubelet pulls the runner image."""

    def for_stage(self, stage: StageName, default_gpus: int) -> StageRequest:
        """`stage`'s pods: its own settings, else the stage's default (masking: no GPU), else these."""
        own = getattr(self.stages, stage.value) or StageResources()
        gpus = own.gpus if own.gpus is not None else \
            0 if stage in CPU_STAGES else self.gpus if self.gpus is not None else default_gpus
        return StageRequest(gpus=gpus, cpu=own.cpu or self.cpu, memory=own.memory or self.memory,
                            scratch=own.scratch or self.scratch)


# Label and annotation keys a pod template may not set: the operator's own (it finds its pods by
# them), the Job controller's, Kueue's (taken from the PurificationJob's labels instead), and the
# annotations that loosen a container's confinement.
RESERVED_KEY_PREFIXES = ("disp.dev/", "app.kubernetes.io/managed-by", "batch.kubernetes.io/", "job-name",
                         "controller-uid", "kueue.x-k8s.io/", "container.apparmor.security.beta.kubernetes.io/",
                         "seccomp.security.alpha.kubernetes.io/", "container.seccomp.security.alpha.kubernetes.io/",
                         "kubectl.kubernetes.io/")


def _no_reserved_keys_rule() -> dict[str, Any]:
    """The same refusal as a CEL rule, so the API server refuses it at apply time."""
    reserved = " || ".join(f"k.startsWith('{prefix}')" for prefix in RESERVED_KEY_PREFIXES)
    return {"x-kubernetes-validations": [{
        "rule": f"self.all(k, !({reserved}))",
        "message": "reserved key: " + ", ".join(f"{p}*" for p in RESERVED_KEY_PREFIXES) + " belong to the operator, "
                   "the Job controller, Kueue or the pod's security settings"}]}


class PodMetadataOverlay(ContractModel):
    labels: Optional[dict[str, LabelValue]] = Field(None, max_length=MAX_MAP_ENTRIES,
                                                    json_schema_extra=_no_reserved_keys_rule())
    """Labels added to every runner pod (cost centre, team)."""
    annotations: Optional[dict[str, AnnotationValue]] = Field(None, max_length=MAX_MAP_ENTRIES,
                                                              json_schema_extra=_no_reserved_keys_rule())
    """Annotations added to every runner pod."""

    @field_validator("labels", "annotations")
    @classmethod
    def _not_reserved(cls, value: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
        for key in value or {}:
            if key.startswith(RESERVED_KEY_PREFIXES):
                raise ValueError(f"{key!r} is reserved (the operator, the Job controller or a pod's security "
                                 "settings own it)")
        return value


class LocalObjectReference(ContractModel):
    name: str = Field(min_length=1, max_length=253)
    """Name of a Secret in the job's namespace."""


class PodSpecOverlay(ContractModel):
    """The scheduling fields of a pod a user may set; security settings, volumes, the service
    account and its token stay the operator's (any other field is refused)."""

    affinity: Optional[dict[str, Any]] = Field(None, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    """Node and pod (anti-)affinity, as in a pod spec."""
    image_pull_secrets: Optional[list[LocalObjectReference]] = Field(None, max_length=MAX_LIST_ITEMS)
    """Secrets to pull the runner image from a private registry."""
    runtime_class_name: Optional[str] = Field(None, min_length=1, max_length=253)
    """RuntimeClass of the runner pods (e.g. a sandboxed runtime for untrusted models)."""
    scheduler_name: Optional[str] = Field(None, min_length=1, max_length=253)
    """Scheduler of the runner pods (e.g. a gang scheduler)."""


class PodTemplateOverlay(ContractModel):
    metadata: PodMetadataOverlay = PodMetadataOverlay()
    """Labels and annotations of every runner pod."""
    spec: PodSpecOverlay = PodSpecOverlay()
    """Scheduling settings of every runner pod."""


class PolicySpec(ContractModel):
    backoff_limit: int = Field(3, ge=0, le=100)
    """Retries of a failed stage (per stage) before the job fails; permanent failures are never retried."""
    active_deadline_seconds: Optional[int] = Field(None, ge=1)
    """Wall-clock limit of each stage Job; a stage that exceeds it fails the job without a retry."""
    suspend: bool = False
    """True stops the job: running stage Jobs are deleted, no pod starts; false resumes from the last
    completed stage. The only field that may change after creation."""
    ttl_seconds_after_finished: Optional[int] = Field(None, ge=0)
    """Seconds after which finished objects are deleted: each stage Job (and its pods) this long
    after it finishes (by Kubernetes), and the PurificationJob itself this long after it succeeds
    or fails (by the operator; its artifacts stay unless cleanupArtifacts). Unset: kept until
    deleted. Leave it unset for jobs applied from Git: Argo CD or Flux would re-create a deleted
    job, and a re-created job (a new uid) is a new run."""
    keep_failed_pods: bool = False
    """Keep the Jobs and pods of failed attempts for debugging (default: deleted when retried)."""
    cleanup_artifacts: bool = False
    """Delete the run's intermediate artifacts when the PurificationJob is deleted (the purified model
    and its provenance.json are kept)."""


class Profile(str, Enum):
    """A preset of settings; every setting it fills can also be given on its own, and one given in
    the manifest wins over the preset."""

    DEFAULT = "default"  # this project's defaults (the paper's hyper-parameters)
    AUTHORS = "authors"  # as the authors' released code runs: docs/authors-code.md, "The DiSP authors' code and this project"


AUTHORS_PROMPT = "Describe this image in detail."
# What `profile: authors` fills in where the manifest is silent (attribute paths from the spec).
# The evaluation's decoding is filled only where the manifest gives one: left out, it is relabel's.
AUTHORS_PRESET: dict[tuple[str, ...], Any] = {
    ("relabel", "prompt"): AUTHORS_PROMPT,
    ("relabel", "decoding", "stop_at_end"): True,
    ("evaluation", "decoding", "stop_at_end"): True,
    ("saliency", "probe_draws"): ProbeDraws.SHARED,
    ("relabel", "empty_answers"): EmptyAnswers.KEEP,
    ("finetune", "labels"): FinetuneLabels.CHAT_TURNS,
    ("finetune", "group_by_length"): True,
}


def _filled(model: ContractModel, path: tuple[str, ...], value: Any) -> ContractModel:
    """`model` with the field at `path` set to `value` unless the manifest set it (or a section on
    the way is absent); a copy when anything changed."""
    head, rest = path[0], path[1:]
    if not rest:
        return model if head in model.model_fields_set else model.model_copy(update={head: value})
    child = getattr(model, head)
    if child is None:
        return model
    new_child = _filled(child, rest, value)
    return model if new_child is child else model.model_copy(update={head: new_child})


class PurificationJobSpec(ContractModel):
    profile: Profile = Profile.DEFAULT
    """authors: the settings in which the authors' released code differs from this project's
    defaults, where the manifest does not set them: the fixed purification prompt "Describe this
    image in detail." (relabel.prompt, which saliency scores for too), their decoding stop rule
    (relabel's and the evaluation's decoding.stopAtEnd), their probe draws (saliency.probeDraws:
    shared), their empty answers kept (relabel.emptyAnswers: keep), their fine-tune labels
    (finetune.labels: chat-turns) and their length-grouped batches (finetune.groupByLength)."""
    model: ModelSource
    """The compromised model to purify."""
    dataset: DatasetSource
    """Its (untrusted) fine-tuning data; no clean data is needed."""
    output: OutputSpec
    """Where stage outputs and the purified model are written."""
    storage: Optional[StorageSpec] = None
    """How to reach S3/MinIO when any URI is s3://."""
    saliency: SaliencySpec = SaliencySpec()
    """Stage 1: Fisher–Jacobian saliency of the visual tokens."""
    masking: MaskingSpec = MaskingSpec()
    """Stage 2: which visual tokens to mask."""
    relabel: RelabelSpec = RelabelSpec()
    """Stage 3: self-inference on the masked inputs."""
    finetune: FinetuneSpec = FinetuneSpec()
    """Stage 4: fine-tuning on the purified dataset."""
    evaluation: Optional[EvaluationSpec] = None
    """Stage 5 (optional): ASR and clean performance before and after."""
    audit: AuditSpec = AuditSpec()
    """Evidence that needs no trigger: suspects among the training instances (relabel) and the
    purified model's residual rate on them (finetune)."""
    rounds: RoundsSpec = RoundsSpec()
    """Closed-loop purification: further rounds, each from the compromised model with a stronger
    recipe, while the audit says the backdoor survived."""
    parallelism: ParallelismSpec = ParallelismSpec()
    """Sharding of the per-instance stages."""
    resources: ResourcesSpec = ResourcesSpec()
    """What each runner pod gets and where it may run; may change while the job is suspended."""
    pod_template: PodTemplateOverlay = PodTemplateOverlay()
    """Labels, annotations and scheduling settings added to every runner pod; may change while
    the job is suspended."""
    policy: PolicySpec = PolicySpec()
    """Retries, deadlines, suspension and clean-up."""
    provenance: ProvenanceSpec = ProvenanceSpec()
    """How the run's provenance record (provenance.json: what made the purified model) is signed."""

    @model_validator(mode="after")
    def _preset(self) -> "PurificationJobSpec":
        if self.profile is Profile.AUTHORS:
            for path, value in AUTHORS_PRESET.items():
                section = _filled(getattr(self, path[0]), path[1:], value) if getattr(self, path[0]) else None
                if section is not None and section is not getattr(self, path[0]):
                    object.__setattr__(self, path[0], section)  # a frozen model, completed while validated
        return self

    def uris(self) -> dict[str, str]:
        """Every URI the spec gives, by its field path ("spec.model.uri", ...)."""
        wire: Any = self.to_wire()
        found = {}
        for path in URI_FIELDS:
            node = wire
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node:
                found[f"spec.{path}"] = node
        return found

    def shards(self, stage: StageName) -> int:
        """Pods `stage` is split over (1 for the stages that are not sharded)."""
        return {StageName.SALIENCY: self.parallelism.saliency_shards,
                StageName.RELABEL: self.parallelism.relabel_shards}.get(stage, 1)

    def stages(self) -> list[StageName]:
        """The stages this job runs, in order (evaluation only when an evaluation set is given)."""
        names = [StageName.SALIENCY, StageName.MASKING, StageName.RELABEL, StageName.FINETUNE]
        return names + ([StageName.EVALUATE] if self.evaluation is not None else [])


class ObjectMeta(ContractModel):
    name: str
    """The job's name (an RFC 1123 label: stage Jobs are named after it)."""
    namespace: str = "default"
    """Namespace; part of the run's artifact prefix."""
    uid: Optional[str] = None
    """Set by Kubernetes; the run's artifact prefix ends in it."""
    generation: Optional[int] = None
    """Set by Kubernetes: which version of the spec this is (recorded in the run's provenance)."""
    labels: dict[str, str] = Field(default_factory=dict)
    """The job's labels (a Kueue queue-name label here is copied to every stage Job)."""

    model_config = ContractModel.model_config | {"extra": "ignore"}  # labels, annotations, ... are not ours

    @field_validator("name", "namespace")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if len(value) > 63 or not _DNS_LABEL.match(value):
            raise ValueError(f"{value!r} is not a valid name: lower-case letters, digits and '-', at most 63")
        return value

    @field_validator("uid")
    @classmethod
    def _uid(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not _UID.match(value):
            raise ValueError(f"{value[:80]!r} is not a valid uid: letters, digits, '-' and '_', at most 128")
        return value


class PurificationJob(ContractModel):
    api_version: Literal["disp.dev/v1alpha1"]
    """Must be disp.dev/v1alpha1."""
    kind: Literal["PurificationJob"]
    """Must be PurificationJob."""
    metadata: ObjectMeta
    """Name, namespace and uid."""
    spec: PurificationJobSpec
    """What to purify and how."""

    @property
    def run_path(self) -> str:
        """The run's folder relative to spec.output.uri: runs/<namespace>/<name>/<run id>."""
        return f"runs/{self.metadata.namespace}/{self.metadata.name}/{self.run_id}"

    def run_uri(self) -> str:
        """Where this run's artifacts live (spec.output.uri joined with run_path)."""
        return f"{self.spec.output.uri.rstrip('/')}/{self.run_path}"

    @property
    def run_id(self) -> str:
        """Kubernetes' uid; outside a cluster, "local-" + a digest of the spec, so rerunning the same
        manifest resumes its run while an edited one starts a new run instead of reusing stale outputs."""
        if self.metadata.uid:
            return self.metadata.uid
        canonical = json.dumps(self.spec.to_wire(), sort_keys=True, separators=(",", ":"))
        return "local-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]
