"""One training loop for every fine-tune in the project (pretraining, backdoor injection, DiSP's
repair), over the model protocol: the masked-diffusion loss, AdamW, cosine schedule with warmup,
and `accelerate` so the same code runs on one CPU, one GPU or several GPUs (bf16 on GPU)."""

from __future__ import annotations

import json
import re
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from disp_api import FinetuneSharding, TrainableParts
from disp_runner.folders import atomic_folder
from disp_runner.device import sub_seed
from disp_runner.errors import DegenerateResultError, UserInputError
from disp_runner.diffusion.distributed import batch_share
from disp_runner.diffusion.objective import add_mask_noise, masked_diffusion_loss, response_window
from disp_runner.models.base import DiffusionVLM, ModelPart, TrainingData


@dataclass(frozen=True)
class TrainingConfig:
    epochs: float = 4.0
    learning_rate: float = 1e-4
    batch_size: int = 32
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    trainable: TrainableParts = TrainableParts.PROJECTOR
    # The projector may learn at its own rate when more than it is trained (LLaVA's mm_projector_lr).
    projector_learning_rate: float | None = None
    # Batches of similar lengths (see `epoch_batches`): less padding when image sizes vary.
    group_by_length: bool = False
    # Recompute each layer in the backward from its input (transformers' gradient checkpointing).
    activation_checkpointing: bool = False
    # With several processes: split parameters, gradients and optimiser state among them (FSDP).
    sharding: FinetuneSharding = FinetuneSharding.NONE

    def __post_init__(self) -> None:
        # Written as "not > 0" so that NaN, which compares false to everything, is refused too.
        if not all(math.isfinite(v) and v > 0 for v in (self.epochs, self.learning_rate, self.batch_size)):
            raise ValueError("epochs, learning_rate and batch_size must be positive and finite")
        if self.projector_learning_rate is not None and not (math.isfinite(self.projector_learning_rate)
                                                             and self.projector_learning_rate > 0):
            raise ValueError("projector_learning_rate must be positive and finite")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError("weight_decay must be non-negative and finite")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")


@dataclass
class TrainingResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    # A sharded run's trained parameters, whole, by name: the model itself stays split among the
    # processes (FSDP cannot be undone in place), so its caller builds the trained model from these.
    sharded_weights: dict[str, torch.Tensor] | None = None

    @property
    def first_loss(self) -> float:
        window = self.losses[: max(1, len(self.losses) // 10)]
        return sum(window) / len(window)

    @property
    def last_loss(self) -> float:
        window = self.losses[-max(1, len(self.losses) // 10):]
        return sum(window) / len(window)


# Which parts each `trainable` setting updates; the rest is frozen.
TRAINED_PARTS = {
    TrainableParts.PROJECTOR: {ModelPart.PROJECTOR},
    TrainableParts.PROJECTOR_AND_LM: {ModelPart.PROJECTOR, ModelPart.LANGUAGE},
    TrainableParts.ALL: set(ModelPart),
}

# Visual-token masking augmentation: (pixel_values, generator) -> [B, T] bool, the visual tokens
# to replace by e_MASK in each example (pretraining uses one so the model answers from partial
# visual evidence, as DiSP's relabeling asks it to).
VisualTokenMask = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def select_trainable(model: DiffusionVLM, parts: TrainableParts) -> list[torch.nn.Parameter]:
    """Freeze everything but `parts`; returns the parameters left trainable, in model order."""
    trained = {id(p) for part in TRAINED_PARTS[parts] for p in model.parameter_parts()[part]}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    return [p for p in model.parameters() if p.requires_grad]


def train_masked_diffusion(
    model: DiffusionVLM,
    data: TrainingData,
    mask_token_id: int,
    config: TrainingConfig,
    description: str = "train",
    show_progress: bool = True,
    checkpoint_dir: Path | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    visual_token_mask: VisualTokenMask | None = None,
) -> TrainingResult:
    """Fine-tune `model` in place on `data` with the LLaDA SFT objective.

    Data order and diffusion noise are seeded per epoch, so with `checkpoint_dir` the loop saves
    its state after every whole epoch and a rerun resumes from the last one, ending with the same
    weights as an uninterrupted run. `on_epoch_end(epoch)` runs after each saved epoch (1-based);
    `on_step(step, total_steps, loss)` after each optimiser step; `visual_token_mask` masks visual
    tokens of every training example (an augmentation; DiSP's own fine-tune uses none).

    Started by the elastic launcher (distributed.py), the same loop runs in every process, each on
    its share of every global batch; only the first process saves checkpoints and calls back."""
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no",
                              cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    if world > 1 and visual_token_mask is not None:
        raise ValueError("visual-token masking draws per process; train with it in one process")
    params = select_trainable(model, config.trainable)
    sharded = world > 1 and config.sharding is FinetuneSharding.FSDP
    if sharded:
        _shard(model, accelerator.device, world)
        params = [p for p in model.parameters() if p.requires_grad]  # sharding replaced every parameter
    projector_ids = {id(p) for p in model.parameter_parts()[ModelPart.PROJECTOR]}
    projector_lr = config.projector_learning_rate or config.learning_rate
    groups = [{"params": [p for p in params if id(p) in projector_ids], "lr": projector_lr},
              {"params": [p for p in params if id(p) not in projector_ids], "lr": config.learning_rate}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)
    result = TrainingResult(steps=0, seconds=0.0)
    first_epoch = 0
    if checkpoint_dir is not None:
        resumed = load_training_checkpoint(checkpoint_dir, model, optimizer)
        if resumed is not None:
            first_epoch, result.losses = resumed
            result.steps = min(total_steps, first_epoch * steps_per_epoch)
            with warnings.catch_warnings():  # replaying the schedule without optimiser steps is intended
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                for _ in range(result.steps):  # the schedule is a pure function of the step count
                    scheduler.step()
    model.train()
    if config.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UserInputError(f"spec.finetune.activationCheckpointing: the {model.config.model_type!r} model family "
                                 "does not support it; turn it off")
        _set_activation_checkpointing(model, True)
    # The scheduler stays unprepared: accelerate would step it once per process per optimiser step
    # (its rule for per-process batches), and here every process shares one global batch. A sharded
    # model is not prepared: accelerate would wrap it in DDP on top of its sharding.
    if not sharded:
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    noise_generator = torch.Generator(device=accelerator.device)
    start = time.perf_counter()
    main = accelerator.is_main_process
    bar = tqdm(total=total_steps, initial=result.steps, desc=description, leave=False, mininterval=1.0,
               disable=not show_progress or not main)
    epoch = first_epoch
    while result.steps < total_steps:
        # Per-epoch seeds make every epoch reproducible on its own, which is what resuming needs.
        order = torch.Generator().manual_seed(sub_seed(config.seed, epoch))
        # Every process draws the same global batches and trains on its share of each.
        loader = epoch_batches(len(data), config.batch_size, order,
                               getattr(data, "lengths", None) if config.group_by_length else None)
        noise_generator.manual_seed(sub_seed(config.seed, epoch + 500_009))
        for global_rows in loader:  # a batch is encoded (its images decoded) only when it is drawn
            rows, positions, share = batch_share(global_rows, rank, world)
            batch = data.batch(rows)
            batch = batch.trim_left(_global_first_real_column(batch, world, accelerator.device)).to(accelerator.device)
            noised = add_mask_noise(batch.input_ids, batch.response_mask, mask_token_id, noise_generator,
                                    rows_of=(len(global_rows), positions))
            image_token_mask = None
            if visual_token_mask is not None:
                image_token_mask = visual_token_mask(batch.pixel_values, noise_generator)
            window = response_window(batch.response_mask)  # the head runs on the answer's columns only
            with accelerator.autocast():
                logits = model(input_ids=noised.noisy_ids, pixel_values=batch.pixel_values,
                               image_sizes=batch.image_sizes, attention_mask=batch.attention_mask,
                               visual_spans=batch.visual_spans, image_token_mask=image_token_mask, logits_at=window)
            loss = masked_diffusion_loss(logits, batch.input_ids, noised, batch.response_mask, window) * share
            batch_loss = loss.detach().clone()  # the whole batch's loss: the shares' sum
            if world > 1:
                torch.distributed.all_reduce(batch_loss)
            if not bool(torch.isfinite(batch_loss)):  # every process sees the same sum and stops together
                raise DegenerateResultError(f"training diverged at step {result.steps + 1}: the loss is "
                                            f"{float(batch_loss)} (learning rate {config.learning_rate}); nothing was saved")
            accelerator.backward(loss * world)  # DDP and FSDP average gradients over the world
            if config.max_grad_norm:
                if sharded:  # the norm of the whole gradient, its shards summed over the processes
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                else:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(float(batch_loss))
            result.steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}", refresh=False)
            if on_step is not None and main:
                on_step(result.steps, total_steps, result.losses[-1])
            if result.steps >= total_steps:
                break
        epoch += 1
        if result.steps == epoch * steps_per_epoch:  # a whole epoch: a resumable point
            if checkpoint_dir is not None:  # every process joins the gathering of a sharded state
                save_training_checkpoint(checkpoint_dir, epoch, unwrapped, optimizer, result.losses, write=main)
            if on_epoch_end is not None and main:
                on_epoch_end(epoch)
    bar.close()
    if sharded:
        result.sharded_weights = {name: _whole(p.detach()).cpu() for name, p in unwrapped.named_parameters()
                                  if p.requires_grad}
    # accelerate wraps (never copies) the module, so the caller's object is the one trained.
    if config.activation_checkpointing:
        _set_activation_checkpointing(unwrapped, False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    result.seconds = time.perf_counter() - start
    return result


def _shard(model: DiffusionVLM, device: torch.device, world: int) -> None:
    """FSDP (torch's fully_shard, per-parameter sharding, the engine of accelerate's FSDP2): each of
    the model's blocks (its `_no_split_modules`: the language model's layers) a unit gathered only
    while it computes, the rest (embeddings, tower, projector, head) one more. Frozen parameters are
    split too but get no gradient or optimiser state. Runs in every process, on CPU (gloo) as on GPU.
    accelerate's own FSDP plugin is not used: it enables itself for GPU worlds only, and one code
    path for both is the one the CPU tests check."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # A block returns its keys and values as views beside its output; FSDP warns that an in-place op
    # on a returned view would skip its gather. Nothing modifies them (the fine-tune reaches the
    # one-process weights: tests/runner/diffusion/test_distributed.py), so the warning only alarms.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (world,))
    model.to(device)
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    for module in [m for m in model.modules() if type(m).__name__ in block_names]:
        fully_shard(module, mesh=mesh)
        for method in getattr(model, "block_forward_methods", ()):  # blocks called other than by __call__
            register_fsdp_forward_method(module, method)
    fully_shard(model, mesh=mesh)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (a collective: every process calls it, in the same order); any
    other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A whole tensor split the way `reference` is (a collective for a sharded one), else as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor):
        return distribute_tensor(tensor.to(reference.device, reference.dtype), reference.device_mesh,
                                 reference.placements)
    return tensor


def _set_activation_checkpointing(model, on: bool) -> None:
    """transformers' activation checkpointing, under its 5.x name where it has it (the older name is
    deprecated there). Non-reentrant: the gradient reaches the projector through recomputed layers."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


# Length grouping sorts this many batches' worth of rows at a time: batches of similar lengths
# while the order stays random at the scale of the epoch (LLaVA's group_by_modality_length).
GROUPED_BATCHES = 16


def epoch_batches(count: int, batch_size: int, order: torch.Generator,
                  lengths: Sequence[int] | None = None) -> list[torch.Tensor]:
    """One epoch's global batches of row indices, drawn with `order`. Without `lengths`: a random
    permutation cut into batches (what a shuffled DataLoader gives). With them: that permutation in
    groups of GROUPED_BATCHES batches, each group sorted longest first and cut into batches, the
    batches then shuffled, so a batch holds rows of similar lengths and pads little."""
    if lengths is None:
        return list(DataLoader(range(count), batch_size=batch_size, shuffle=True, generator=order, drop_last=False))
    permutation = torch.randperm(count, generator=order).tolist()
    span = batch_size * GROUPED_BATCHES
    batches = []
    for lo in range(0, count, span):
        group = sorted(permutation[lo:lo + span], key=lambda i: -lengths[i])  # stable: ties keep the draw
        batches += [torch.tensor(group[i:i + batch_size]) for i in range(0, len(group), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=order).tolist()]


def _global_first_real_column(batch, world: int, device: torch.device) -> int:
    """The first column that holds a real token in any row of the global batch, this process's share
    being `batch`: every process cuts the same columns, so the shares keep one shape."""
    first = batch.first_real_column()
    if world > 1:
        agreed = torch.tensor([first], dtype=torch.long, device=device)  # NCCL reduces GPU tensors only
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        first = int(agreed)
    return first


# -- epoch checkpoints ----------------------------------------------------------------------------
# Safetensors for every tensor (never pickle: a run folder may sit in a shared bucket) and JSON for
# the rest. Only trainable weights are saved: the projector alone by default, a few MB even for
# billion-parameter models.

def _epoch_dir(checkpoint_dir: Path, epoch: int) -> Path:
    return checkpoint_dir / f"epoch-{epoch:04d}"


def save_training_checkpoint(checkpoint_dir: Path, epoch: int, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer, losses: list[float], write: bool = True) -> None:
    """Save the trainable weights and optimiser state after `epoch`, whole: a sharded model's are
    gathered by every process (call it in all of them), and the one with `write` writes them."""
    weights = {name: _whole(p.detach()).cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index in sorted(state["state"]):  # the same order in every process: gathering is collective
        entry = state["state"][index]
        for key in sorted(entry):
            value = entry[key]
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = _whole(value.detach()).cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    if not write:
        return
    final = _epoch_dir(checkpoint_dir, epoch)
    with atomic_folder(final) as staging:  # the folder appears complete or not at all
        save_file(weights, str(staging / "trainable.safetensors"))
        save_file(tensors, str(staging / "optimizer.safetensors"))
        (staging / "state.json").write_text(json.dumps({"epoch": epoch, "losses": losses, "scalars": scalars,
                                                        "param_groups": state["param_groups"]}))
    for older in checkpoint_dir.glob("epoch-*"):
        if older != final:
            shutil.rmtree(older, ignore_errors=True)


def load_training_checkpoint(checkpoint_dir: Path, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer) -> tuple[int, list[float]] | None:
    """Restore the last epoch checkpoint into `model` and `optimizer`; (epoch, losses) or None."""
    epochs = sorted(checkpoint_dir.glob("epoch-*")) if checkpoint_dir.is_dir() else []
    if not epochs:
        return None
    folder = epochs[-1]
    state = json.loads((folder / "state.json").read_text())
    weights = load_file(str(folder / "trainable.safetensors"))
    own = dict(model.named_parameters())
    trainable = {name for name, p in own.items() if p.requires_grad}
    if set(weights) != trainable:
        raise UserInputError(f"{folder}: checkpoint holds other trainable weights than this fine-tune "
                             f"(was `trainable` changed?); delete {checkpoint_dir} to start over")
    with torch.no_grad():
        for name in sorted(weights):  # the same order in every process: splitting is collective
            own[name].copy_(_like(weights[name], own[name]))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param: dict[int, dict] = {}
    for key, value in sorted([*tensors.items(), *state["scalars"].items()]):
        index, name = key.split(".", 1)
        # AdamW's moments are split like their parameter; its step count stays whole
        shaped = torch.is_tensor(value) and value.dim() > 0
        per_param.setdefault(int(index), {})[name] = _like(value, params[int(index)]) if shaped else value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    return int(state["epoch"]), list(state["losses"])
