"""Saving and (safely) loading models of every family, in Hugging Face format.

Models under purification are untrusted by definition, so these rules hold for every family and
are written only here: the family is chosen by config.json's `model_type` before anything else is
read; sizes are checked before a model is built; weights are safetensors only (pickle-based `.bin`,
`.pt`, ... only when the caller explicitly opts in), with hostile headers refused before parsing;
remote code is never run; every weight must be present, expected and finite; and the tokenizer
must agree with the config.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from disp_api.contract import PICKLE_WEIGHT_SUFFIXES, SAFE_WEIGHT_SUFFIXES, weight_files
from disp_runner.device import default_device
from disp_runner.errors import DegenerateResultError, UnsafeModelFormatError, UserInputError
from disp_runner.models.base import DiffusionVLM, ModelFamily, ModelPart, Processor, adopt_mask_token
from disp_runner.models.registry import family_for

logger = logging.getLogger(__name__)

# Our own progress bars and one-line summaries say what happens; transformers' per-shard bars
# would only clutter stderr, where user errors must stand on one line.
hf_logging.disable_progress_bar()

# A safetensors file starts with the length of its JSON header; the library allocates that much
# before it checks anything, so a hostile length is refused first.
MAX_SAFETENSORS_HEADER = 100 * 2**20
MAX_INDEX_BYTES = 64 * 2**20  # model.safetensors.index.json: a few MB even for the largest models
INDEX_FILE = "model.safetensors.index.json"
# The memory a model's weights may need, in GiB; default: this machine's (or container's) memory.
MEMORY_BUDGET_ENV = "DISP_MODEL_MEMORY_GIB"
BYTES_PER_PARAMETER = {"float32": 4, "float16": 2, "bfloat16": 2}


class LoadedModel(NamedTuple):
    model: DiffusionVLM
    processor: Processor


def save_model(model: DiffusionVLM, processor: Processor, folder: str | Path) -> Path:
    """Write model (safetensors) + tokenizer; refuses to write non-finite weights."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DegenerateResultError(f"weight {name} holds NaN or infinite values; the model was not saved")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def projector_parameters(model: DiffusionVLM) -> dict[str, torch.nn.Parameter]:
    """The projector's parameters by their names in the model (model.mm_projector.* for LLaDA-V)."""
    chosen = {id(p) for p in model.parameter_parts()[ModelPart.PROJECTOR]}
    return {name: p for name, p in model.named_parameters() if id(p) in chosen}


def save_projector(model: DiffusionVLM, path: Path) -> Path:
    """The projector alone, as safetensors keyed by parameter name (what `load_projector` reads)."""
    tensors = {name: p.detach().cpu().contiguous() for name, p in projector_parameters(model).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def load_projector(model: DiffusionVLM, path: Path, allow_unsafe_pickle: bool = False) -> None:
    """Replace the model's projector by the one in `path` (safetensors; pickle only when opted in,
    and then unpickling tensors only). Every projector weight must be there, with its shape, finite,
    and nothing else."""
    if path.name.endswith(SAFE_WEIGHT_SUFFIXES):
        _safetensors_header(path)
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any failure to parse an untrusted file is the file's fault
            raise UserInputError(f"{path}: cannot read the projector ({type(exc).__name__})") from None
    elif path.name.endswith(PICKLE_WEIGHT_SUFFIXES):
        if not allow_unsafe_pickle:
            raise UnsafeModelFormatError(f"{path}: a pickle file can run arbitrary code, so it is refused unless you "
                                         "pass --allow-unsafe-pickle (spec.model.allowUnsafePickle)")
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - as above
            raise UserInputError(f"{path}: cannot read the projector ({type(exc).__name__})") from None
        if not isinstance(tensors, dict) or not all(torch.is_tensor(t) for t in tensors.values()):
            raise UserInputError(f"{path}: expected a dict of tensors keyed by parameter name")
    else:
        raise UserInputError(f"{path}: a projector is a .safetensors file (or a pickle .bin with the opt-in)")
    own = projector_parameters(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise UserInputError(f"{path}: the projector's weights are {', '.join(sorted(own))}; "
                             + (f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(unexpected[:5])}"))
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise UserInputError(f"{path}: {name} has shape {list(tensor.shape)}, the model's {list(own[name].shape)}")
        if not tensor.is_floating_point():
            raise UserInputError(f"{path}: {name} is stored as {tensor.dtype}, not a floating-point type")
        if not bool(torch.isfinite(tensor).all()):
            raise UserInputError(f"{path}: {name} holds NaN or infinite values")
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor.to(own[name].dtype))


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


def _safetensors_header(path: Path) -> dict:
    """A safetensors file's JSON header (tensor name -> dtype, shape, offsets), its length checked
    against the file before anything is read."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise UserInputError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_length,) = struct.unpack("<Q", head)
        if header_length > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise UserInputError(f"{path}: corrupt safetensors file (header length {header_length}, file {size} bytes)")
        try:
            header = json.loads(handle.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise UserInputError(f"{path}: corrupt safetensors header ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise UserInputError(f"{path}: corrupt safetensors header")
    return header


def memory_budget() -> int:
    """Bytes the weights of one model may take: $DISP_MODEL_MEMORY_GIB, else the physical memory."""
    value = os.environ.get(MEMORY_BUDGET_ENV)
    if value:
        try:
            gib = float(value)
        except ValueError:
            gib = -1.0
        if not gib > 0:
            raise UserInputError(f"{MEMORY_BUDGET_ENV}={value!r}: expected a positive number of GiB")
        return int(gib * 2**30)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_model_fits(family: ModelFamily, config: dict, config_path: Path) -> None:
    """A config whose sizes need more memory than the budget is refused before anything is built."""
    if family.parameter_count is None:
        return
    try:
        parameters = family.parameter_count(config)
    except (ValueError, TypeError, KeyError) as exc:
        raise UserInputError(f"{config_path}: {exc}") from None
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    needed, budget = parameters * BYTES_PER_PARAMETER.get(str(dtype), 4), memory_budget()
    if needed > budget:
        raise UserInputError(f"{config_path}: these sizes make a model of about {parameters / 1e9:.3g} B parameters, "
                             f"{needed / 2**30:.1f} GiB as {dtype}, more than the {budget / 2**30:.1f} GiB its weights "
                             f"may use (set {MEMORY_BUDGET_ENV} to allow more)")


def _tensor_names(folder: Path, safe: list[Path]) -> set[str]:
    """Names of the tensors a safetensors checkpoint holds, from its index or its files' headers
    (both checked already), without reading a tensor."""
    if (folder / INDEX_FILE).is_file():
        return set(_read_config(folder / INDEX_FILE)["weight_map"])
    return {name for path in safe for name in _safetensors_header(path) if name != "__metadata__"}


def _check_index(folder: Path) -> None:
    """A sharded checkpoint's index may name only safetensors files inside the folder."""
    path = folder / INDEX_FILE
    if not path.is_file():
        return
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise UserInputError(f"{path}: {path.stat().st_size} bytes, more than an index can need")
    weight_map = _read_config(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserInputError(f"{path}: expected a non-empty \"weight_map\" object")
    for tensor, shard in weight_map.items():
        if not (isinstance(shard, str) and shard == Path(shard).name and shard not in (".", "..")
                and shard.endswith(".safetensors")):
            raise UserInputError(f"{path}: tensor {tensor!r} is in {shard!r}, which is not a safetensors file of "
                                 "this folder")
        if not (folder / shard).is_file():
            raise UserInputError(f"{path}: tensor {tensor!r} is in {shard}, which is missing")


def load_tokenizer(folder: str | Path, family: ModelFamily | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved beside a model; never runs remote code. With `family`, the tokens
    the family relies on must be there."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise UserInputError(f"{folder}: no tokenizer.json / tokenizer_config.json found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse an untrusted file is the file's fault
        raise UserInputError(f"{folder}: cannot load tokenizer: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    where = folder / "tokenizer.json"
    if family is not None:
        vocab = tokenizer.get_vocab()
        missing = [t for t in family.required_tokens if t not in vocab]
        if missing:
            raise UserInputError(f"{where}: tokenizer lacks the special token(s) {', '.join(missing)}")
        adopt_mask_token(tokenizer, family.processor_class.known_mask_token)
    if tokenizer.mask_token is None or tokenizer.mask_token_id is None:
        raise UserInputError(f"{where}: tokenizer does not declare a mask token")
    return tokenizer


_AUTO_MAP_TOLD: set[str] = set()


def _say_auto_map_ignored(config_path: Path, family: ModelFamily) -> None:
    """Once per model type and process: the checkpoint's own code is not what runs."""
    if family.model_type not in _AUTO_MAP_TOLD:
        _AUTO_MAP_TOLD.add(family.model_type)
        logger.warning("%s: auto_map ignored: the checkpoint's own code is never run; the built-in %r family "
                       "loads its weights", config_path, family.model_type)


# Weights are floating point; an integer tensor where a weight belongs (an int8-quantised export, a
# corrupted header) would be cast silently and compute nonsense. int64 is kept for index buffers.
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
INDEX_DTYPES = {"I64"}


def _check_weight_dtypes(path: Path, header: dict) -> None:
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        dtype = entry.get("dtype")
        if dtype not in FLOAT_DTYPES | INDEX_DTYPES:
            raise UserInputError(f"{path}: tensor {name} is stored as {dtype}, not a floating-point type (quantised "
                                 "checkpoints are not supported: export the weights in float16, bfloat16 or float32)")


CONFIG_DTYPES = ("float32", "float16", "bfloat16")


def _load_dtype(config: dict, config_path: Path) -> torch.dtype | str:
    """The precision weights are held in: the checkpoint's own ("auto") on a GPU, where autocast
    computes in bf16; float32 on a CPU, whose half-precision kernels are slow and where float16
    overflows in training (a diverged fine-tune after three stages were published)."""
    for key in ("dtype", "torch_dtype"):
        if config.get(key) is not None and config[key] not in CONFIG_DTYPES:
            raise UserInputError(f"{config_path}: {key} must be one of {', '.join(CONFIG_DTYPES)}, got {config[key]!r}")
    if default_device().type == "cuda":
        return "auto"
    stored = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    if stored in ("float16", "bfloat16"):
        logger.info("%s: %s weights held in float32 on the CPU", config_path, stored)
    return torch.float32


def _load_failure(exc: BaseException) -> str:
    """Why loading failed, in one line. torch's refusal of a pickle that holds more than tensors
    ends with advice to load it with weights_only=False, which would run the file's code: that is
    never the way out for an untrusted model, so it is not repeated."""
    text = str(exc)
    if "weights_only" in text or "Unsupported global" in text or type(exc).__name__ == "UnpicklingError":
        return ("the pickle file holds objects other than tensors, which would run code when loaded; it is refused "
                "even with allowUnsafePickle (convert the weights to safetensors)")
    first = (text.strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}"


def load_model(folder: str | Path, allow_unsafe_pickle: bool = False) -> LoadedModel:
    """Load model + processor from a local folder, refusing anything unsafe or inconsistent."""
    folder = Path(folder)
    if folder.is_file():
        raise UserInputError(f"{folder}: a file; a model is a folder (config.json, tokenizer and weights)")
    if not folder.is_dir():
        raise UserInputError(f"{folder}: model folder does not exist")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserInputError(f"{config_path}: model config not found")
    config_dict = _read_config(config_path)
    family = family_for(config_dict.get("model_type"), str(config_path))
    if config_dict.get("auto_map") is not None:
        if not family.native_for_auto_map:
            raise UserInputError(f"{config_path}: auto_map asks for the checkpoint's own code, which this runner "
                                 f"never runs; remove it to load the weights with the built-in "
                                 f"{family.model_type!r} family")
        _say_auto_map_ignored(config_path, family)
    # gen_length is optional (null: not said), but a length of 0 or "16" must not decode a default.
    optional = {"gen_length": None} if config_dict.get("gen_length") is not None else {}
    for key in (*family.positive_sizes, *optional):
        value = config_dict.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
            raise UserInputError(f"{config_path}: {key} must be a positive integer, got {value!r}")
    _check_model_fits(family, config_dict, config_path)
    _check_index(folder)
    safe, pickled = _weight_files(folder)
    if not safe:
        if not pickled:
            raise UserInputError(f"{folder}: no model weights (*.safetensors) found")
        if not allow_unsafe_pickle:
            raise UnsafeModelFormatError(
                f"{folder}: only pickle weights ({', '.join(p.name for p in pickled)}) found; pickle can run "
                "arbitrary code, so it is refused unless you pass --allow-unsafe-pickle")
    for path in safe:
        _check_weight_dtypes(path, _safetensors_header(path))
    tokenizer = load_tokenizer(folder, family)
    overrides = {}
    if family.config_for_weights is not None and safe:
        try:
            overrides = family.config_for_weights(config_dict, _tensor_names(folder, safe))
        except ValueError as exc:
            raise UserInputError(f"{config_path}: {exc}") from None
    try:
        model, info = family.model_class.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False, use_safetensors=bool(safe),
            output_loading_info=True, key_mapping=family.key_mapping, dtype=_load_dtype(config_dict, config_path),
            **overrides)
    except Exception as exc:  # noqa: BLE001 - any failure to parse an untrusted file is the file's fault
        raise UserInputError(f"{folder}: cannot load model weights ({_load_failure(exc)})") from None
    # A missing tensor would silently keep its random initialisation.
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            names = sorted(str(k if isinstance(k, str) else k[0]) for k in info[kind])
            raise UserInputError(f"{folder}: {kind.replace('_', ' ')} in the weights: {', '.join(names[:5])}"
                                 + (f" (and {len(names) - 5} more)" if len(names) > 5 else ""))
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserInputError(f"{folder}: weight {name} holds NaN or infinite values")
    return LoadedModel(model, family.processor_class(tokenizer, model.config, str(folder)))
