"""Building, saving and (safely) loading MDLM checkpoints in Hugging Face format.

Models under purification are untrusted by definition: we load safetensors only, never run remote
code, and refuse pickle-based weights (`.bin`, `.pt`, ...) unless the caller explicitly opts in.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from disp_runner.errors import UnsafeModelFormatError, UserInputError
from disp_runner.modeling import MDLMConfig, MDLMForMaskedDiffusion
from disp_runner.tokenization import SpecialTokens, load_tokenizer

# Our own progress bars and one-line summaries say what happens; transformers' per-shard bars
# would only clutter stderr, where user errors must stand on one line.
hf_logging.disable_progress_bar()

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def build_model(tokenizer: PreTrainedTokenizerBase, **size: int) -> MDLMForMaskedDiffusion:
    """A freshly initialised MDLM whose special-token ids come from `tokenizer`."""
    config = MDLMConfig(
        vocab_size=len(tokenizer),
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        image_token_id=tokenizer.convert_tokens_to_ids(SpecialTokens.IMAGE),
        **size,
    )
    return MDLMForMaskedDiffusion(config)


def save_checkpoint(model: MDLMForMaskedDiffusion, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    files = [p for p in folder.iterdir() if p.is_file()]
    safe = [p for p in files if p.name.endswith(".safetensors")]
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin"]
    return safe, pickled


def load_checkpoint(
    folder: str | Path,
    allow_unsafe_pickle: bool = False,
) -> tuple[MDLMForMaskedDiffusion, PreTrainedTokenizerBase]:
    """Load model + tokenizer from a local folder, refusing anything unsafe or inconsistent."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"{folder}: model folder does not exist")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserInputError(f"{config_path}: model config not found")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{config_path}: not valid JSON ({exc.msg})") from None
    if model_type != MDLMConfig.model_type:
        raise UserInputError(f"{config_path}: model_type is {model_type!r}; this runner loads "
                             f"{MDLMConfig.model_type!r} models (remote code is never enabled)")
    safe, pickled = _weight_files(folder)
    if not safe:
        if not pickled:
            raise UserInputError(f"{folder}: no model weights (*.safetensors) found")
        if not allow_unsafe_pickle:
            raise UnsafeModelFormatError(
                f"{folder}: only pickle weights ({', '.join(p.name for p in pickled)}) found; pickle can run "
                "arbitrary code, so it is refused unless you pass --allow-unsafe-pickle")
    tokenizer = load_tokenizer(folder)
    try:
        model = MDLMForMaskedDiffusion.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False, use_safetensors=bool(safe))
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserInputError(f"{folder}: cannot load model weights: {str(exc).splitlines()[0]}") from exc
    config = model.config
    if tokenizer.mask_token_id != config.mask_token_id:
        raise UserInputError(f"{folder}: tokenizer's [MASK] id {tokenizer.mask_token_id} differs from "
                             f"config.mask_token_id {config.mask_token_id}")
    if len(tokenizer) > config.vocab_size:
        raise UserInputError(f"{folder}: tokenizer has {len(tokenizer)} tokens, model vocab_size is {config.vocab_size}")
    return model, tokenizer
