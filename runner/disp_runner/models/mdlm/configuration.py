"""Configuration of the built-in multimodal diffusion language model.

Size is configuration only: the same code runs a ~1 M-parameter CPU demo and a multi-billion
parameter model on GPUs.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from disp_api.model_shapes import config_size


class MDLMConfig(PretrainedConfig):
    """Vision encoder -> projector (2-layer MLP, GELU) -> bidirectional transformer LM.

    Token ids of the special tokens are stored here, read from the tokenizer when the model is
    built, so no other file hard-codes them.
    """

    model_type = "disp_mdlm"

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: int = 512,
        max_position_embeddings: int = 256,
        rope_theta: float = 10000.0,
        layer_norm_eps: float = 1e-5,
        image_size: int = 48,
        patch_size: int = 8,
        num_channels: int = 3,
        vision_stem_channels: int = 0,
        vision_hidden_size: int = 64,
        vision_num_layers: int = 1,
        vision_num_heads: int = 4,
        vision_intermediate_size: int = 256,
        projector_hidden_act: str = "gelu",
        mask_token_id: int = 2,
        pad_token_id: int = 0,
        eos_token_id: int = 3,
        image_token_id: int = 4,
        initializer_range: float = 0.02,
        gen_length: int = 32,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.layer_norm_eps = layer_norm_eps
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        # 0: ViT-style linear patchify; >0: a 3x3 conv stem of this width before patchifying,
        # which small models need to see shapes inside a patch.
        self.vision_stem_channels = vision_stem_channels
        self.vision_hidden_size = vision_hidden_size
        self.vision_num_layers = vision_num_layers
        self.vision_num_heads = vision_num_heads
        self.vision_intermediate_size = vision_intermediate_size
        self.projector_hidden_act = projector_hidden_act
        self.mask_token_id = mask_token_id
        self.image_token_id = image_token_id
        self.initializer_range = initializer_range
        # Response positions the model was trained to fill (answers padded with [EOS] up to it);
        # the default generation length. 32 is the authors' setting.
        self.gen_length = gen_length
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)
        self.validate_shapes()

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image: one per patch."""
        return (self.image_size // self.patch_size) ** 2

    def validate_shapes(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_attention_heads {self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("attention head size must be even for rotary position embeddings")
        if self.vision_hidden_size % 4:
            raise ValueError(f"vision_hidden_size {self.vision_hidden_size} must be a multiple of 4 (2D sin-cos positions)")
        if self.vision_stem_channels and self.patch_size % 2:
            raise ValueError(f"patch_size {self.patch_size} must be even with a conv stem (it halves the resolution)")
        if self.vision_num_layers and self.vision_hidden_size % self.vision_num_heads:
            raise ValueError(
                f"vision_hidden_size {self.vision_hidden_size} not divisible by vision_num_heads {self.vision_num_heads}")


def parameter_count(config: dict) -> int:
    """About how many parameters an MDLM config.json describes (the large terms)."""
    defaults = MDLMConfig()
    size = {key: config_size(config, key, getattr(defaults, key)) for key in (
        "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "vision_hidden_size",
        "vision_num_layers", "vision_intermediate_size", "patch_size", "num_channels")}
    d, dv = size["hidden_size"], size["vision_hidden_size"]
    language = 2 * size["vocab_size"] * d + size["num_hidden_layers"] * (4 * d * d + 2 * d * size["intermediate_size"])
    vision = (size["vision_num_layers"] * (4 * dv * dv + 2 * dv * size["vision_intermediate_size"])
              + size["num_channels"] * size["patch_size"] ** 2 * dv)
    return language + vision + dv * d + d * d
