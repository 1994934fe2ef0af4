"""LLaDA-V's config.json (`model_type` "llava_llada"): the language model's fields under LLaMA's
names, the multimodal fields LLaVA's train.py writes, and the vision tower's config.

The published config.json names its vision tower by hub id (`mm_vision_tower`) and does not carry
the tower's own config; with no hub here, a config without `vision_config` gets the config of
SigLIP2 so400m-patch14-384 with the last layer removed (as LLaDA-V's SigLipVisionTower removes it).
Those values, and the multimodal defaults below, are derived from the LLaDA-V/LLaVA code, not read
from the published files.
"""

from __future__ import annotations

import re

from transformers import LlamaConfig, SiglipVisionConfig

from disp_api.model_shapes import SO400M_PATCH14_384, config_size

LLADA_MASK_TOKEN_ID = 126336  # <|mdm_mask|> in LLaDA's tokenizer; the tokenizer is checked to agree


class LladaVConfig(LlamaConfig):
    model_type = "llava_llada"

    def __init__(self, vision_config: dict | SiglipVisionConfig | None = None, mm_hidden_size: int | None = None,
                 mm_projector_type: str = "mlp2x_gelu", mm_vision_select_layer: int = -2,
                 mm_vision_select_feature: str = "patch", mm_patch_merge_type: str = "spatial_unpad",
                 image_aspect_ratio: str = "anyres_max_4", image_grid_pinpoints: str | list = "(1x1),...,(6x6)",
                 mask_token_id: int = LLADA_MASK_TOKEN_ID, vision_feature_layer: int | None = None, **kwargs):
        if isinstance(vision_config, SiglipVisionConfig):
            vision_config = vision_config.to_dict()
        self.vision_config = {**SO400M_PATCH14_384, **(vision_config or {})}
        self.mm_hidden_size = mm_hidden_size or self.vision_config["hidden_size"]
        self.mm_projector_type = mm_projector_type
        self.mm_vision_select_layer = mm_vision_select_layer
        self.mm_vision_select_feature = mm_vision_select_feature
        self.mm_patch_merge_type = mm_patch_merge_type
        self.image_aspect_ratio = image_aspect_ratio
        self.image_grid_pinpoints = image_grid_pinpoints
        self.mask_token_id = mask_token_id
        # Which of the tower's hidden states are the visual features (None: its last layer's). Set
        # when a checkpoint keeps the layer LLaDA-V drops (see config_for_weights).
        self.vision_feature_layer = vision_feature_layer
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.is_causal = False  # LLaDA is LLaMA without the causal mask

    def siglip_config(self) -> SiglipVisionConfig:
        return SiglipVisionConfig(**{k: v for k, v in self.vision_config.items()
                                     if k not in ("model_type", "transformers_version")})


def parameter_count(config: dict) -> int:
    """About how many parameters a LLaDA-V config.json describes (the large terms): ~8.4 B for the
    published sizes."""
    d = config_size(config, "hidden_size", 4096)
    heads = config_size(config, "num_attention_heads", 32)
    kv = config_size(config, "num_key_value_heads", heads)
    head_dim = config_size(config, "head_dim", max(1, d // heads))
    language = (2 * config_size(config, "vocab_size", 126464) * d
                + config_size(config, "num_hidden_layers", 32)
                * (2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * config_size(config, "intermediate_size", 12288)))
    vision_config = config.get("vision_config") or {}
    if not isinstance(vision_config, dict):
        raise ValueError(f"vision_config must be an object, got {type(vision_config).__name__}")
    vision = {**SO400M_PATCH14_384, **vision_config}
    dv = config_size(vision, "hidden_size", 1152)
    side = config_size(vision, "image_size", 384) // config_size(vision, "patch_size", 14)
    tower = (config_size(vision, "num_hidden_layers", 26) * (4 * dv * dv + 2 * dv * config_size(vision, "intermediate_size", 4304))
             + side * side * dv)
    return language + tower + config_size(config, "mm_hidden_size", dv) * d + d * d


_VISION_LAYER = re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\.encoder\.layers\.(\d+)\.")


def config_for_weights(config: dict, names: set[str]) -> dict:
    """LLaDA-V saves its tower without the last SigLIP layer (its features are the one before). A
    checkpoint that kept that layer loads with it, unused: features stay the declared depth's."""
    layers = {int(match.group(1)) for name in names if (match := _VISION_LAYER.match(name))}
    vision = {**SO400M_PATCH14_384, **(config.get("vision_config") or {})}
    declared, found = vision["num_hidden_layers"], max(layers, default=-1) + 1
    if not layers or found == declared:
        return {}
    if found == declared + 1:
        return {"vision_config": {**vision, "num_hidden_layers": found}, "vision_feature_layer": declared}
    raise ValueError(f"the weights hold {found} vision tower layers, vision_config.num_hidden_layers says {declared}")
