"""LLaDA-V natively: transformers' LLaMA language model with the causal mask removed (LLaDA), the
SigLIP vision tower without its last layer and head, the mlp2x_gelu projector, and anyres packing
with `image_newline` — no remote code. Module paths reproduce the published weight names:

    model.embed_tokens / model.layers.N.* / model.norm / lm_head          (LLaMA names)
    model.mm_projector.{0,2}.*                                             (Linear, GELU, Linear)
    model.image_newline                                                    [D]
    model.vision_tower.vision_tower.vision_model.{embeddings,encoder,post_layernorm}.*

Visual tokens are the projector's output after packing and newline insertion; that is where DiSP
scores and masks (the whole visual span, newline tokens included), as the authors' code does.
The model implements `disp_runner.models.base.DiffusionVLM`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LlamaModel, LlamaPreTrainedModel, SiglipVisionModel

from disp_runner.models.base import KeyValueContext, ModelPart, split_parameters
from disp_runner.models.llada_v.anyres import anyres_geometry, expand_pinpoints, max_views_of
from disp_runner.models.llada_v.configuration import LladaVConfig


class SiglipTower(nn.Module):
    """LLaDA-V's SigLipVisionTower: holds the SigLIP model under `vision_tower`."""

    def __init__(self, config: LladaVConfig):
        super().__init__()
        self.vision_tower = _SiglipHolder(config)
        self.feature_layer = -1 if config.vision_feature_layer is None else config.vision_feature_layer

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> features of the last kept layer, before post_layernorm: [N, side², Dv]."""
        out = self.vision_tower.vision_model(pixel_values=views, output_hidden_states=True)
        return out.hidden_states[self.feature_layer]


class _SiglipHolder(nn.Module):
    """SigLIP's own wrapper level in the original code, kept for the weight names."""

    def __init__(self, config: LladaVConfig):
        super().__init__()
        self.vision_model = SiglipVisionModel(config.siglip_config())


class LladaVModel(LlamaModel):
    """The LLaMA backbone plus LLaDA-V's multimodal modules, under the published names."""

    def __init__(self, config: LladaVConfig):
        super().__init__(config)
        # What this implementation reproduces; another setting would silently compute something else.
        for field, supported in (("mm_projector_type", "mlp2x_gelu"), ("mm_vision_select_feature", "patch"),
                                 ("mm_patch_merge_type", "spatial_unpad")):
            if getattr(config, field) != supported:
                raise ValueError(f"{field} {getattr(config, field)!r}: only {supported!r} is supported")
        self.mm_projector = nn.Sequential(nn.Linear(config.mm_hidden_size, config.hidden_size), nn.GELU(),
                                          nn.Linear(config.hidden_size, config.hidden_size))
        self.image_newline = nn.Parameter(torch.zeros(config.hidden_size))
        self.vision_tower = SiglipTower(config)


class LladaVForMaskedDiffusion(LlamaPreTrainedModel):
    """LlamaForCausalLM's layout (`model`, `lm_head`), bidirectional, with LLaDA-V's visual input."""

    config_class = LladaVConfig
    # Names of original-format LLaDA language-model weights (model.transformer.*, as LaViDa ships
    # them) -> LLaMA names; from_pretrained applies it, so both layouts load into the same modules.
    ORIGINAL_LLADA_KEYS = {
        r"^model\.transformer\.wte\.": "model.embed_tokens.",
        r"^model\.transformer\.ln_f\.": "model.norm.",
        r"^model\.transformer\.ff_out\.": "lm_head.",
        r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.": r"model.layers.\1.input_layernorm.",
        r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.": r"model.layers.\1.post_attention_layernorm.",
        r"^model\.transformer\.blocks\.(\d+)\.q_proj\.": r"model.layers.\1.self_attn.q_proj.",
        r"^model\.transformer\.blocks\.(\d+)\.k_proj\.": r"model.layers.\1.self_attn.k_proj.",
        r"^model\.transformer\.blocks\.(\d+)\.v_proj\.": r"model.layers.\1.self_attn.v_proj.",
        r"^model\.transformer\.blocks\.(\d+)\.attn_out\.": r"model.layers.\1.self_attn.o_proj.",
        r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.": r"model.layers.\1.mlp.gate_proj.",
        r"^model\.transformer\.blocks\.(\d+)\.up_proj\.": r"model.layers.\1.mlp.up_proj.",
        r"^model\.transformer\.blocks\.(\d+)\.ff_out\.": r"model.layers.\1.mlp.down_proj.",
    }

    def __init__(self, config: LladaVConfig):
        super().__init__(config)
        self.model = LladaVModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        for layer in self.model.layers:  # belt and braces: config.is_causal already selects a full mask
            layer.self_attn.is_causal = False
        vision = config.vision_config
        self.view_size, self.side = vision["image_size"], vision["image_size"] // vision["patch_size"]
        self.pinpoints = expand_pinpoints(config.image_grid_pinpoints, self.view_size)
        self.max_views = max_views_of(config.image_aspect_ratio)
        self.post_init()

    # -- disp_runner.models.base.DiffusionVLM --------------------------------------------------
    def mask_embedding(self) -> torch.Tensor:
        return self.model.embed_tokens.weight[self.config.mask_token_id]

    def embed_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, V, 3, S, S] (each image's base view then its crops, zero views after),
        image_sizes [B, 2] (height, width) -> packed visual tokens [B, T, D], zeros after a row's T_i."""
        geometries = [anyres_geometry(int(w), int(h), self.view_size, self.side, self.pinpoints, self.max_views)
                      for h, w in image_sizes.tolist()]
        views = torch.cat([pixel_values[i, :g.views] for i, g in enumerate(geometries)])
        dtype = self.model.mm_projector[0].weight.dtype
        features = self.model.mm_projector(self.model.vision_tower(views.to(dtype)))  # [N, side², D]
        rows, start = [], 0
        for geometry in geometries:
            rows.append(self._pack(features[start:start + geometry.views], geometry))
            start += geometry.views
        return nn.utils.rnn.pad_sequence(rows, batch_first=True)

    def _pack(self, features: torch.Tensor, geometry) -> torch.Tensor:
        """One image's views [V, side², D] -> base tokens, then the unpadded (and maybe shrunk) crop
        map with a newline after each row: [side² + rows·(cols + 1), D]."""
        side, (across, down) = self.side, geometry.crops
        d = features.shape[-1]
        crop_map = features[1:].reshape(down, across, side, side, d).permute(4, 0, 2, 1, 3)  # [D, down, side, across, side]
        crop_map = crop_map.reshape(d, down * side, across * side)
        rows_slice, cols_slice = geometry.unpadded
        crop_map = crop_map[:, rows_slice, cols_slice]
        if tuple(crop_map.shape[1:]) != geometry.packed:
            crop_map = F.interpolate(crop_map[None], size=geometry.packed, mode="bilinear")[0]
        newline = self.model.image_newline.to(crop_map.dtype)[:, None, None].expand(-1, crop_map.shape[1], 1)
        packed = torch.cat([crop_map, newline], dim=2).flatten(1).T  # [rows·(cols+1), D]
        return torch.cat([features[0], packed])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                visual_spans: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                image_token_mask: torch.Tensor | None = None, logits_at: slice | None = None,
                **_: object) -> torch.Tensor:
        """Logits [B, L, V] ([B, W, V] of the positions `logits_at` only): the visual tokens replace
        the placeholders of each row's visual span; positions count from each row's first real token
        (rows are left-padded)."""
        if visual_spans is not None and image_embeds is None:
            image_embeds = self.embed_images(pixel_values, image_sizes)
        if image_embeds is not None and image_token_mask is not None:
            image_embeds = torch.where(image_token_mask[..., None], self.mask_embedding().to(image_embeds.dtype),
                                       image_embeds)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        hidden = self.model(inputs_embeds=self._embed(input_ids, visual_spans, image_embeds),
                            attention_mask=attention_mask, position_ids=_positions(attention_mask),
                            use_cache=False).last_hidden_state
        return self.lm_head(hidden if logits_at is None else hidden[:, logits_at])

    def _embed(self, input_ids: torch.Tensor, visual_spans: torch.Tensor | None,
               image_embeds: torch.Tensor | None) -> torch.Tensor:
        embeds = self.model.embed_tokens(input_ids)
        return embeds if visual_spans is None else _scatter_spans(embeds, image_embeds, visual_spans)

    # -- disp_runner.models.base.PromptCaching: transformers' own key/value cache, bidirectional --
    def forward_with_context(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             visual_spans: torch.Tensor, image_embeds: torch.Tensor, keep: torch.Tensor,
                             logits_at: slice) -> tuple[torch.Tensor, KeyValueContext]:
        cache = DynamicCache(config=self.config)
        hidden = self.model(inputs_embeds=self._embed(input_ids, visual_spans, image_embeds),
                            attention_mask=attention_mask, position_ids=_positions(attention_mask), cache=cache,
                            use_cache=True).last_hidden_state
        context = KeyValueContext([(layer.keys[:, :, keep], layer.values[:, :, keep]) for layer in cache.layers])
        return self.lm_head(hidden[:, logits_at]), context

    def forward_over_context(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, window: slice,
                             keep: torch.Tensor, context: KeyValueContext) -> torch.Tensor:
        cache = DynamicCache(config=self.config)  # a fresh one: a pass appends its own keys to it
        for index, (keys, values) in enumerate(context.layers):
            cache.update(keys, values, index)
        # The mask covers the keys in the cache's order: the context's positions, then the window's.
        key_mask = torch.cat([attention_mask[:, keep], attention_mask[:, window]], dim=1)
        hidden = self.model(inputs_embeds=self.model.embed_tokens(input_ids[:, window]), attention_mask=key_mask,
                            position_ids=_positions(attention_mask)[:, window], cache=cache,
                            use_cache=True).last_hidden_state
        return self.lm_head(hidden)

    def parameter_parts(self) -> dict[ModelPart, list[nn.Parameter]]:
        # image_newline belongs to neither the tower nor the projector: DiSP's default (projector
        # only) leaves it frozen, as the authors' mm_tunable_parts=mm_mlp_adapter does.
        return split_parameters(self, self.model.vision_tower, self.model.mm_projector)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding: positions count from each row's first real token. [B, L]"""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _scatter_spans(embeds: torch.Tensor, image_embeds: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Row i's first spans[i, 1] visual tokens placed at positions spans[i, 0]... of `embeds`."""
    b, length, _ = embeds.shape
    positions = torch.arange(length, device=embeds.device)[None, :]  # [1, L]
    start, count = spans[:, :1], spans[:, 1:]
    inside = (positions >= start) & (positions < start + count)  # [B, L]
    index = (positions - start).clamp(0, image_embeds.shape[1] - 1)  # visual token for every position
    gathered = torch.gather(image_embeds.to(embeds.dtype), 1, index[..., None].expand(-1, -1, embeds.shape[-1]))
    return torch.where(inside[..., None], gathered, embeds)
