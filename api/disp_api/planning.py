"""How much memory and arithmetic each heavy stage needs, from the model's config alone: before a
stage computes, a batch that cannot fit is refused with the numbers, and the largest batch that
fits a device can be chosen.

The estimate counts what PyTorch holds at the stage's peak, term by term:

* weights: every parameter at the precision it is held in (the checkpoint's on a GPU, where
  autocast computes in bf16; fp32 on a CPU);
* saved activations: what autograd keeps per token and layer of the language model when a
  gradient flows back through it (saliency's vector-Jacobian products, and the fine-tune, whose
  trainable projector sits before the language model). Per token and layer of a LLaMA block
  with frozen weights (a frozen linear keeps nothing): each RMSNorm its input in fp32 and its
  inverse RMS; attention q and k after rotary, v and its output, and its log-sum-exp per head;
  the SwiGLU MLP gate, up and silu(gate):  2·(4·D + 4) + a·(2·D + 2·D_kv) + 4·H + 3·a·I  bytes,
  a the activation width (2 under bf16 autocast, 4 in fp32); padded rows add the [L, L] mask
  and the attention output once more, a trained language model its linear layers' inputs, and
  activation checkpointing keeps each layer's input plus one layer's tensors instead (checked
  against autograd's saved-tensor hooks in tests/runner/test_planning.py);
* the working set of the widest step: the backward's gradients at the widest layer, or, without
  a backward, one layer's intermediates (the MLP's three I-wide tensors dominate);
* logits of the answer's positions only (the head is never applied elsewhere) and their fp32 and
  fp64 copies; the prompt cache's keys and values when relabel uses one; the optimiser state
  and gradients of the trainable parameters (a process's share of both under FSDP, which also
  holds two layers' weights whole while they compute).

What it leaves out: the CUDA context and allocator slack (about 0.5–1 GiB outside PyTorch's
tensors, left as headroom), and on a CPU the interpreter and libraries (RUNTIME_BYTES_CPU).
The arithmetic (`stage_flops`) counts matrix products only, as MFU is conventionally counted:
2 FLOPs per multiply-add, a backward pass for input gradients costing as much as the forward,
one that also forms weight gradients twice as much, attention 4·L²·D per layer forward.

Pure Python: the operator can plan without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

# What a CPU process holds besides the model: the interpreter, torch, transformers, their
# libraries and allocator (measured by benchmarks/memory_planner.py: a process that builds the
# ~120 M configuration and encodes a batch peaks 0.74–0.81 GiB above its weights).
RUNTIME_BYTES_CPU = int(0.8 * 2**30)
# Left free on a GPU for the CUDA context, cuBLAS workspaces and the caching allocator's slack.
GPU_HEADROOM_BYTES = int(2.0 * 2**30)
FP32, FP64 = 4, 8
# Room a batch picked for the user leaves above the estimate: on an H100 the estimate of every
# stage came within 5% of the measured peak (benchmarks/results/gpu_scale-h100.txt), and the
# caching allocator fragments.
BATCH_MARGIN = 1.1


class PlannedStage(str, Enum):
    SALIENCY = "saliency"
    RELABEL = "relabel"
    RELABEL_CACHED = "relabel (prefix cache)"
    FINETUNE = "finetune"


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory and arithmetic, read from a config.json."""

    vocab: int
    hidden: int  # D
    intermediate: int  # I
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    body_parameters: int  # the language model's blocks (no embedding, no head)
    vision_parameters: int
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    tokens_per_view: int  # visual tokens one view gives the tower (27² for SigLIP at 384 px)
    projector_parameters: int

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def head_parameters(self) -> int:
        return self.vocab * self.hidden

    @property
    def parameters(self) -> int:
        embedding = self.vocab * self.hidden
        final_norm = separator = self.hidden  # the LM's last RMSNorm; the image newline token
        return (self.body_parameters + embedding + self.head_parameters + self.vision_parameters
                + self.projector_parameters + final_norm + separator)


@dataclass(frozen=True)
class Workload:
    """One batch of a stage: `batch` rows of `sequence` tokens (the longest row; shorter rows are
    padded to it), `answer` positions whose logits are read (a decoding block for relabel, the
    first block for saliency, the answer for the fine-tune), `views` tower views per row."""

    batch: int
    sequence: int
    answer: int
    views: int
    probes: int = 6  # saliency's vector-Jacobian products (the graph is kept between them)
    steps: int = 32  # relabel's decoding steps
    prompt: int | None = None  # relabel's cached prompt length (default: sequence - answer)
    trainable_parameters: int = 0  # the fine-tune's (the projector by default)
    trains_language_model: bool = False
    checkpointing: bool = False  # the fine-tune's activation checkpointing: layer inputs kept, one layer recomputed
    shards: int = 1  # the fine-tune's FSDP processes: each holds 1/shards of the weights and optimiser state


@dataclass(frozen=True)
class Precision:
    weight_bytes: int  # per parameter as held
    activation_bytes: int  # per activation element (2: bf16 autocast; 4: fp32)
    device: str  # "cuda" or "cpu"

    @classmethod
    def for_device(cls, device: str, checkpoint_bytes: int = 2) -> "Precision":
        """How the runner holds a model: the checkpoint's precision with bf16 autocast on a GPU,
        fp32 everywhere on a CPU (models/loading.py)."""
        return cls(checkpoint_bytes, 2, "cuda") if device == "cuda" else cls(FP32, FP32, "cpu")


@dataclass(frozen=True)
class MemoryEstimate:
    stage: PlannedStage
    parts: dict[str, int]  # bytes by what holds them

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / 2**30:.2f}" for name, value in self.parts.items() if value)
        return f"{self.stage.value}: {self.total / 2**30:.2f} GiB ({parts})"


def saved_bytes_per_token_layer(shape: ModelShape, precision: Precision, sequence: int = 0,
                                linear_inputs_kept: bool = False) -> int:
    """What autograd keeps per token and language-model layer (the module docstring's terms).
    `sequence`: the padded length when rows are padded (the attention mask is kept per layer)."""
    d, a = shape.hidden, precision.activation_bytes
    norms = 2 * (FP32 * d + FP32)  # each RMSNorm's input in fp32 and its inverse RMS
    attention = a * (2 * d + 2 * shape.kv_width) + FP32 * shape.heads  # q, k, v, output; log-sum-exp
    mlp = 3 * a * shape.intermediate  # gate, up, silu(gate)
    # Padded rows: the [L, L] additive mask, one copy per layer, and (seen in the saved-tensor
    # hooks) the attention's output kept once more on the masked path.
    mask = a * (sequence + d) if sequence else 0
    # A frozen linear needs no input to pass gradients on; a trained one keeps it: q/k/v's and
    # gate/up's shared normed inputs, o_proj's and down_proj's.
    linear_inputs = a * (3 * d + shape.intermediate) if linear_inputs_kept else 0
    return norms + attention + mlp + mask + linear_inputs


def _tower_working_set(shape: ModelShape, work: Workload, precision: Precision) -> int:
    """The vision tower's widest no-grad step over every view of the batch, plus the views' pixels."""
    tokens = work.batch * work.views * shape.tokens_per_view
    a = precision.activation_bytes
    pixels = work.batch * work.views * 3 * (shape.tokens_per_view * 14 * 14) * FP32
    return tokens * a * (3 * shape.vision_hidden + 2 * shape.vision_intermediate) + pixels


def _layer_working_set(shape: ModelShape, rows: int, precision: Precision) -> int:
    """One layer's intermediates alive at once in a forward without a graph (`rows` tokens): the
    residual, its fp32 norm and the MLP's gate, up and product."""
    a = precision.activation_bytes
    return rows * (a * 2 * shape.hidden + FP32 * shape.hidden + a * 3 * shape.intermediate)


def _backward_working_set(shape: ModelShape, rows: int, precision: Precision) -> int:
    """Gradients alive at once in a backward through one layer (`rows` tokens)."""
    a = precision.activation_bytes
    return rows * (a * 3 * shape.intermediate + FP32 * 2 * shape.hidden + a * 2 * shape.hidden)


def _held_weights(shape: ModelShape, work: Workload, precision: Precision) -> int:
    """The weights one process holds: all of them, or under FSDP its share of the language model's
    layers, two layers gathered whole (the one computing and the next, prefetched) and the rest of
    the model (embeddings, tower, projector, head: the outer unit, whole from forward to backward)."""
    whole = shape.parameters * precision.weight_bytes
    if work.shards <= 1:
        return whole
    layer = shape.body_parameters // shape.layers
    outer = shape.parameters - shape.body_parameters
    return (outer + shape.body_parameters // work.shards + 2 * layer) * precision.weight_bytes


def _visual_tokens(work: Workload) -> int:
    return work.batch * work.sequence  # an upper bound: the visual span is most of the sequence


def estimate_memory(shape: ModelShape, stage: PlannedStage, work: Workload, precision: Precision) -> MemoryEstimate:
    """Peak bytes of one batch of `stage` (see the module docstring for what is counted)."""
    a = precision.activation_bytes
    rows = work.batch * work.sequence
    parts = {"weights": _held_weights(shape, work, precision)}
    logits = work.batch * work.answer * shape.vocab
    if stage in (PlannedStage.SALIENCY, PlannedStage.FINETUNE):
        padded = work.sequence if work.batch > 1 else 0  # one row is never padded
        trained = stage is PlannedStage.FINETUNE and work.trains_language_model
        per_layer = rows * saved_bytes_per_token_layer(shape, precision, padded, trained)
        if stage is PlannedStage.FINETUNE and work.checkpointing:
            # every layer's input, and one layer's saved tensors while its backward recomputes them
            parts["saved activations"] = rows * shape.layers * a * shape.hidden + per_layer
        else:
            parts["saved activations"] = shape.layers * per_layer
        parts["backward working set"] = _backward_working_set(shape, rows, precision)
        # logits as computed, in fp32 for the loss / softmax, and the gradient flowing into them
        parts["logits"] = logits * (a + 2 * FP32)
        if stage is PlannedStage.SALIENCY:
            # the visual tokens, δe and each probe's gradient in fp64 (scores are accumulated exactly)
            parts["visual tokens"] = _visual_tokens(work) * shape.hidden * (2 * a + 2 * FP64)
        else:
            trainable = work.trainable_parameters
            # gradient + AdamW's two moments, in the parameters' precision
            parts["optimiser"] = trainable * 3 * precision.weight_bytes // work.shards
            parts["visual tokens"] = _visual_tokens(work) * shape.hidden * 2 * a
    else:
        parts["layer working set"] = _layer_working_set(shape, rows, precision)
        parts["visual tokens"] = _visual_tokens(work) * shape.hidden * a
        # logits of one block as computed, in fp64 for Gumbel noise, in fp32 for the softmax
        parts["logits"] = logits * (a + FP64 + FP32)
        if stage is PlannedStage.RELABEL_CACHED:
            prompt = work.prompt if work.prompt is not None else work.sequence - work.answer
            # every layer's keys and values of the prompt; copied once while the cache is cut
            parts["prompt cache"] = 2 * shape.layers * work.batch * prompt * 2 * shape.kv_width * a
    tower = _tower_working_set(shape, work, precision)
    # The tower runs before the language model; its working set is gone by the language model's peak.
    language = sum(v for k, v in parts.items() if k != "weights")
    if tower > language:
        parts = {"weights": parts["weights"], "vision tower": tower}
    if precision.device == "cpu":
        parts["runtime"] = RUNTIME_BYTES_CPU
    return MemoryEstimate(stage, parts)


def largest_batch(shape: ModelShape, stage: PlannedStage, work: Workload, precision: Precision,
                  device_bytes: int, limit: int = 1024) -> int:
    """The largest batch (up to `limit`) that fits `device_bytes` less the headroom with the
    batch-dependent part of the estimate raised by BATCH_MARGIN; 0 when not even one row fits.
    A refusal trusts the estimate; a recommendation keeps the margin."""
    budget = device_bytes - (GPU_HEADROOM_BYTES if precision.device == "cuda" else 0)

    def fits(batch: int) -> bool:
        estimate = estimate_memory(shape, stage, replace(work, batch=batch), precision)
        fixed = estimate.parts["weights"] + estimate.parts.get("runtime", 0)
        return fixed + (estimate.total - fixed) * BATCH_MARGIN <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def stage_flops(shape: ModelShape, stage: PlannedStage, work: Workload) -> float:
    """Model FLOPs of one batch of `stage` (matrix products only; the module docstring's rules)."""
    rows = work.batch * work.sequence
    per_token_body = 2 * shape.body_parameters
    attention = 4 * shape.layers * work.batch * work.sequence ** 2 * shape.hidden  # bidirectional, forward
    head = 2 * shape.head_parameters * work.batch * work.answer
    tower_tokens = work.batch * work.views * shape.tokens_per_view
    tower = (2 * shape.vision_parameters * tower_tokens
             + 4 * shape.vision_layers * work.batch * work.views * shape.tokens_per_view ** 2 * shape.vision_hidden)
    projector = 2 * shape.projector_parameters * tower_tokens
    forward = per_token_body * rows + attention + head
    if stage is PlannedStage.SALIENCY:  # one forward, then m backward passes for input gradients
        return tower + projector + forward + work.probes * forward
    if stage is PlannedStage.FINETUNE:  # input gradients down to the projector (+ weight gradients if trained)
        backward = forward * (2 if work.trains_language_model else 1)
        # Recomputed layers are not model FLOPs (MFU counts what the model needs, not what is redone).
        return tower + 3 * projector + forward + backward
    if stage is PlannedStage.RELABEL:  # every step a full forward, the head on one block
        return tower + projector + work.steps * forward
    # prefix cache: one full pass, then each step a pass over the answer attending to the prompt
    prompt = work.prompt if work.prompt is not None else work.sequence - work.answer
    window = work.batch * work.answer
    step = (per_token_body * window + 4 * shape.layers * window * (prompt + work.answer) * shape.hidden + head)
    return tower + projector + forward + (work.steps - 1) * step
