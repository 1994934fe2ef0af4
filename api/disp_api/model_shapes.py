"""The sizes the memory planner needs (disp_api.planning.ModelShape), read from a model family's
config.json: the runner plans a stage with them before it computes, the operator before it admits
a job. Pure arithmetic over an untrusted dict: a bad size raises ValueError naming its key."""

from __future__ import annotations

from typing import Callable, Optional

from disp_api.planning import ModelShape

# SigLIP2 so400m-patch14-384, 27 encoder layers of which LLaDA-V keeps 26 (its features are the
# second-to-last layer's: mm_vision_select_layer -2).
SO400M_PATCH14_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                          image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                          vision_use_head=False)


def config_size(config: dict, key: str, default: int) -> int:
    """A size from an untrusted config dict: a positive integer, else ValueError naming `key`."""
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def vision_config(config: dict) -> dict:
    """config.json's `vision_config` (empty when absent), or ValueError when it is not an object."""
    value = config.get("vision_config") or {}
    if not isinstance(value, dict):
        raise ValueError(f"vision_config must be an object, got {type(value).__name__}")
    return value


def llada_v_shape(config: dict) -> ModelShape:
    """LLaDA-V's sizes (model_type "llava_llada"): a LLaMA language model after a SigLIP tower and
    LLaVA's two-layer projector. A config without `vision_config` has the published tower's."""
    d = config_size(config, "hidden_size", 4096)
    heads = config_size(config, "num_attention_heads", 32)
    kv = config_size(config, "num_key_value_heads", heads)
    head_dim = config_size(config, "head_dim", max(1, d // heads))
    inter = config_size(config, "intermediate_size", 12288)
    layers = config_size(config, "num_hidden_layers", 32)
    vision = {**SO400M_PATCH14_384, **vision_config(config)}
    dv, iv = config_size(vision, "hidden_size", 1152), config_size(vision, "intermediate_size", 4304)
    vision_layers = config_size(vision, "num_hidden_layers", 26)
    side = config_size(vision, "image_size", 384) // config_size(vision, "patch_size", 14)
    patch = config_size(vision, "patch_size", 14)
    mm = config_size(config, "mm_hidden_size", dv)
    return ModelShape(
        vocab=config_size(config, "vocab_size", 126464), hidden=d, intermediate=inter, layers=layers, heads=heads,
        kv_heads=kv, head_dim=head_dim,
        body_parameters=layers * (2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * inter + 2 * d),
        # SigLIP: attention and MLP with biases, two LayerNorms a layer; patch and position
        # embeddings; the final LayerNorm (kept, unused: the features are taken before it).
        vision_parameters=(vision_layers * (4 * dv * dv + 2 * dv * iv + 9 * dv + iv)
                           + (3 * patch * patch + 1 + side * side + 2) * dv),
        vision_hidden=dv, vision_intermediate=iv, vision_layers=vision_layers, tokens_per_view=side * side,
        projector_parameters=mm * d + d * d + 2 * d)


# config.json's model_type -> its family's shape; a family without one is not planned.
SHAPES: dict[str, Callable[[dict], ModelShape]] = {"llava_llada": llada_v_shape}


def shape_of(config: dict) -> Optional[ModelShape]:
    """The planner's shape of the model a config.json describes; None for a family it has none for."""
    shape = SHAPES.get(config.get("model_type"))  # type: ignore[arg-type]
    return None if shape is None else shape(config)
