"""Building, saving and (safely) loading MDLM checkpoints in Hugging Face format.

Models under purification are untrusted by definition: we load safetensors only, never run remote
code, and refuse pickle-based weights (`.bin`, `.pt`, ...) unless the caller explicitly opts in.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from disp_api.contract import weight_files
from disp_runner.errors import DegenerateResultError, UnsafeModelFormatError, UserInputError
from disp_runner.modeling import MDLMConfig, MDLMForMaskedDiffusion
from disp_runner.tokenization import SpecialTokens, load_tokenizer

# Our own progress bars and one-line summaries say what happens; transformers' per-shard bars
# would only clutter stderr, where user errors must stand on one line.
hf_logging.disable_progress_bar()

# A safetensors file starts with the length of its JSON header; the library allocates that much
# before it checks anything, so a hostile length is refused first.
MAX_SAFETENSORS_HEADER = 100 * 2**20
# Config sizes that must be positive integers before a model is built from them.
_POSITIVE_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                   "max_position_embeddings", "image_size", "patch_size", "num_channels", "vision_hidden_size",
                   "vision_num_layers", "vision_num_heads", "vision_intermediate_size")


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
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DegenerateResultError(f"weight {name} holds NaN or infinite values; the model was not saved")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    safe, pickled = weight_files(files)
    return [folder / n for n in safe], [folder / n for n in pickled]


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserInputError(f"{path}: not valid JSON ({getattr(exc, 'msg', type(exc).__name__)})") from None
    if not isinstance(config, dict):
        raise UserInputError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _check_safetensors_header(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
    if len(head) < 8:
        raise UserInputError(f"{path}: truncated safetensors file ({size} bytes)")
    (header_length,) = struct.unpack("<Q", head)
    if header_length > min(size - 8, MAX_SAFETENSORS_HEADER):
        raise UserInputError(f"{path}: corrupt safetensors file (header length {header_length}, file {size} bytes)")


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
    config_dict = _read_config(config_path)
    model_type = config_dict.get("model_type")
    if model_type != MDLMConfig.model_type:
        raise UserInputError(f"{config_path}: model_type is {model_type!r}; this runner loads "
                             f"{MDLMConfig.model_type!r} models (remote code is never enabled)")
    for key in _POSITIVE_SIZES:
        value = config_dict.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
            raise UserInputError(f"{config_path}: {key} must be a positive integer, got {value!r}")
    safe, pickled = _weight_files(folder)
    if not safe:
        if not pickled:
            raise UserInputError(f"{folder}: no model weights (*.safetensors) found")
        if not allow_unsafe_pickle:
            raise UnsafeModelFormatError(
                f"{folder}: only pickle weights ({', '.join(p.name for p in pickled)}) found; pickle can run "
                "arbitrary code, so it is refused unless you pass --allow-unsafe-pickle")
    for path in safe:
        _check_safetensors_header(path)
    tokenizer = load_tokenizer(folder)
    try:
        model, info = MDLMForMaskedDiffusion.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False, use_safetensors=bool(safe),
            output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse an untrusted file is the file's fault
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise UserInputError(f"{folder}: cannot load model weights ({type(exc).__name__}: {first})") from None
    # A missing tensor would silently keep its random initialisation.
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            names = sorted(str(k if isinstance(k, str) else k[0]) for k in info[kind])
            raise UserInputError(f"{folder}: {kind.replace('_', ' ')} in the weights: {', '.join(names[:5])}"
                                 + (f" (and {len(names) - 5} more)" if len(names) > 5 else ""))
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserInputError(f"{folder}: weight {name} holds NaN or infinite values")
    config = model.config
    if tokenizer.mask_token_id != config.mask_token_id:
        raise UserInputError(f"{folder}: tokenizer's [MASK] id {tokenizer.mask_token_id} differs from "
                             f"config.mask_token_id {config.mask_token_id}")
    if len(tokenizer) > config.vocab_size:
        raise UserInputError(f"{folder}: tokenizer has {len(tokenizer)} tokens, model vocab_size is {config.vocab_size}")
    return model, tokenizer
