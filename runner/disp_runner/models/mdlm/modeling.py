"""The built-in MDLM: vision encoder -> projector -> bidirectional transformer, as in LLaDA-V.

Shapes: B batch, L sequence length, T visual tokens per image, D LM width, V vocabulary.
Each sequence is laid out (left-padded) as

    [PAD ...] [<image> x T] [prompt tokens] [response tokens]

and the T `<image>` placeholders are replaced by the projected image embeddings (`embed_inputs`).
The model implements `disp_runner.models.base.DiffusionVLM`.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from disp_runner.models.base import KeyValueContext, ModelPart, split_parameters
from disp_runner.models.mdlm.configuration import MDLMConfig


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [B, L] -> cos, sin: [B, 1, L, head_dim]
        # Computed on the fly (not a buffer) so weight loading never has to know about it.
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=position_ids.device,
                                                      dtype=torch.float32) / self.head_dim))
        freqs = position_ids.float()[..., None] * inv_freq  # [B, L, head_dim/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos(), emb.sin()


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding: real tokens are numbered from 0 whatever the padding in front of them. [B, L]"""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class SelfAttention(nn.Module):
    """Full (bidirectional) multi-head self-attention; rotary positions optional."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, rope=None,
                context: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, tuple]:
        """Output [B, L, D] and this call's own keys and values ([B, H, L, hd], rotated). With
        `context` (cached keys and values [B, H, C, hd]) the positions also attend to those, and
        `key_mask` covers the context first, then x: [B, C + L]."""
        b, l, d = x.shape  # x: [B, L, D]
        q, k, v = self.qkv(x).view(b, l, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, hd]
        if rope is not None:
            cos, sin = rope
            q = q * cos.to(q.dtype) + _rotate_half(q) * sin.to(q.dtype)
            k = k * cos.to(k.dtype) + _rotate_half(k) * sin.to(k.dtype)
        own = (k, v)
        if context is not None:
            k, v = torch.cat([context[0].to(k.dtype), k], dim=2), torch.cat([context[1].to(v.dtype), v], dim=2)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :].bool()  # [B, 1, 1, C + L]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, L, hd]
        return self.out(y.transpose(1, 2).reshape(b, l, d)), own


class TransformerBlock(nn.Module):
    """Pre-norm block shared by the vision encoder and the language model."""

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = SelfAttention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(hidden, intermediate), nn.GELU(), nn.Linear(intermediate, hidden))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, rope=None) -> torch.Tensor:
        return self.forward_with_keys(x, key_mask, rope)[0]

    def forward_with_keys(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, rope=None,
                          context: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, tuple]:
        """The block's output and its attention's own keys and values (see SelfAttention)."""
        attended, keys_values = self.attn(self.norm1(x), key_mask, rope, context)
        x = x + attended
        return x + self.mlp(self.norm2(x)), keys_values


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """[grid*grid, width] sine-cosine embedding of (row, col), row-major; half the width per axis."""
    if width % 4:
        raise ValueError(f"vision_hidden_size {width} must be a multiple of 4 for 2D sin-cos positions")
    quarter = width // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))  # [W/4]
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(values: torch.Tensor) -> torch.Tensor:
        angles = values.reshape(-1, 1) * freqs  # [T, W/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [T, W/2]

    return torch.cat([encode(rows), encode(cols)], dim=1)  # [T, W]


class VisionEncoder(nn.Module):
    """Image -> patch features, a small ViT (SigLIP's role in LLaDA-V). Frozen after pretraining."""

    def __init__(self, config: MDLMConfig):
        super().__init__()
        c = config
        if c.vision_stem_channels:
            # Hybrid ViT: a small conv stem (full, then half resolution) sees shapes inside a patch,
            # which a linear patchify learns only slowly at this scale.
            s = c.vision_stem_channels
            self.stem = nn.Sequential(nn.Conv2d(c.num_channels, s, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(s, s, 3, stride=2, padding=1), nn.GELU())
            self.patch_embed = nn.Conv2d(s, c.vision_hidden_size, c.patch_size // 2, stride=c.patch_size // 2)
        else:
            self.stem = nn.Identity()
            self.patch_embed = nn.Conv2d(c.num_channels, c.vision_hidden_size, c.patch_size, stride=c.patch_size)
        # Fixed 2D sin-cos positions (as in MAE): every patch feature says where the patch is from
        # the first step, which a learned table picks up only slowly at this scale. Computed in
        # forward (tiny), not held as a buffer: weight loading then never has to restore it.
        self.grid = c.image_size // c.patch_size
        self.width = c.vision_hidden_size
        self.blocks = nn.ModuleList(
            TransformerBlock(c.vision_hidden_size, c.vision_num_heads, c.vision_intermediate_size, c.layer_norm_eps)
            for _ in range(c.vision_num_layers))
        self.norm = nn.LayerNorm(c.vision_hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, C, H, W] in [0, 1] -> features [B, T, Dv]
        x = self.patch_embed(self.stem(pixel_values * 2.0 - 1.0)).flatten(2).transpose(1, 2)
        x = x + sincos_2d(self.grid, self.width).to(device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Projector(nn.Module):
    """Two-layer MLP with GELU from vision features to LM embeddings (LLaDA-V's mlp2x_gelu).

    Both the backdoor injection and DiSP's repair fine-tune only this module.
    """

    def __init__(self, config: MDLMConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_hidden_size, config.hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))  # [B, T, Dv] -> [B, T, D]


class MDLMPreTrainedModel(PreTrainedModel):
    config_class = MDLMConfig
    base_model_prefix = "mdlm"
    supports_gradient_checkpointing = False
    _no_split_modules = ["TransformerBlock"]
    # How the language model calls its blocks (not through __call__): sharding gathers a block's
    # weights around these calls too.
    block_forward_methods = ("forward_with_keys",)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class MDLMForMaskedDiffusion(MDLMPreTrainedModel):
    """Multimodal masked-diffusion LM: predicts the clean token at every position."""

    def __init__(self, config: MDLMConfig):
        super().__init__(config)
        self.vision_encoder = VisionEncoder(config)
        self.projector = Projector(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta)
        self.layers = nn.ModuleList(
            TransformerBlock(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                             config.layer_norm_eps)
            for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # -- disp_runner.models.base.DiffusionVLM --------------------------------------------------
    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    def mask_embedding(self) -> torch.Tensor:
        """e_MASK: the embedding that masking a position (text or visual) puts there. [D]"""
        return self.embed_tokens.weight[self.config.mask_token_id]

    def embed_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Visual tokens: [B, C, H, W] -> [B, T, D] (every image has the model's size)."""
        expected = (self.config.num_channels, self.config.image_size, self.config.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                             f"got {list(pixel_values.shape)}")
        features = self.vision_encoder(pixel_values.to(self.projector.linear_1.weight.dtype))
        return self.projector(features)

    def embed_inputs(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the `<image>` placeholders replaced by `image_embeds` ([B, T, D])."""
        embeds = self.embed_tokens(input_ids)  # [B, L, D]
        image_positions = input_ids == self.config.image_token_id  # [B, L]
        if image_embeds is None:
            if image_positions.any():
                raise ValueError("input_ids contain <image> placeholders but no image was given")
            return embeds
        b, t, d = image_embeds.shape
        counts = image_positions.sum(dim=1)
        if b != input_ids.shape[0] or bool((counts != t).any()):
            raise ValueError(f"each sequence needs exactly {t} <image> placeholders for image_embeds "
                             f"{list(image_embeds.shape)}; found {counts.tolist()}")
        # Row-major order of the placeholders matches patch order.
        embeds = embeds.masked_scatter(image_positions[..., None], image_embeds.to(embeds.dtype).reshape(-1, d))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        image_token_mask: torch.Tensor | None = None,
        visual_spans: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        logits_at: slice | None = None,
        **_: object,
    ) -> torch.Tensor:
        """Logits [B, L, V] ([B, W, V] of the positions `logits_at` only). Give `input_ids` (+ `pixel_values` or precomputed `image_embeds`) or
        ready `inputs_embeds`. `attention_mask` [B, L] marks real (1) vs padding (0) tokens.
        `image_token_mask` [B, T] (True = replace that visual token by e_MASK) masks visual tokens
        the way DiSP does; training with it teaches the model to answer from partial evidence.
        `visual_spans` and `image_sizes` are not needed: every image has the model's size, and the
        `<image>` placeholders say where the visual tokens go."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            if image_embeds is None and pixel_values is not None:
                image_embeds = self.embed_images(pixel_values)
            if image_token_mask is not None and image_embeds is not None:
                if image_token_mask.shape != image_embeds.shape[:2]:
                    raise ValueError(f"image_token_mask {list(image_token_mask.shape)} does not match "
                                     f"image_embeds {list(image_embeds.shape[:2])}")
                image_embeds = torch.where(image_token_mask[..., None], self.mask_embedding().to(image_embeds.dtype),
                                           image_embeds)
            inputs_embeds = self.embed_inputs(input_ids, image_embeds)
        x, _ = self._language_model(inputs_embeds, attention_mask)
        return self.lm_head(self.norm(x if logits_at is None else x[:, logits_at]))

    def _language_model(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                        keep: torch.Tensor | None = None) -> tuple[torch.Tensor, KeyValueContext | None]:
        """Hidden states [B, L, D] of the transformer, and the keys and values of the positions
        where `keep` [L] is True (none without it)."""
        b, l, _ = inputs_embeds.shape
        if l > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {l} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = torch.ones(b, l, dtype=torch.long, device=inputs_embeds.device)
        rope = self.rotary(_positions(attention_mask))
        x, kept = inputs_embeds, []
        for layer in self.layers:
            x, (k, v) = layer.forward_with_keys(x, attention_mask, rope)
            if keep is not None:
                kept.append((k[:, :, keep], v[:, :, keep]))
        return x, (KeyValueContext(kept) if keep is not None else None)

    # -- disp_runner.models.base.PromptCaching -------------------------------------------------
    def forward_with_context(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             visual_spans: torch.Tensor, image_embeds: torch.Tensor, keep: torch.Tensor,
                             logits_at: slice) -> tuple[torch.Tensor, KeyValueContext]:
        x, context = self._language_model(self.embed_inputs(input_ids, image_embeds), attention_mask, keep)
        return self.lm_head(self.norm(x[:, logits_at])), context

    def forward_over_context(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, window: slice,
                             keep: torch.Tensor, context: KeyValueContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids[:, window])
        rope = self.rotary(_positions(attention_mask)[:, window])
        key_mask = torch.cat([attention_mask[:, keep], attention_mask[:, window]], dim=1)
        for layer, layer_context in zip(self.layers, context.layers):
            x, _ = layer.forward_with_keys(x, key_mask, rope, layer_context)
        return self.lm_head(self.norm(x))

    def parameter_parts(self) -> dict[ModelPart, list[nn.Parameter]]:
        return split_parameters(self, self.vision_encoder, self.projector)
