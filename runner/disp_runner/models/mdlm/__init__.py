"""The embedded family: the small MDLM (LLaDA-V's shape: vision encoder -> mlp2x_gelu projector ->
bidirectional transformer) that ships with the project, its tokenizer, layout and pretraining."""

from transformers import AutoConfig, AutoModel, PreTrainedTokenizerBase

from disp_runner.models.base import ModelFamily
from disp_runner.models.mdlm.configuration import MDLMConfig, parameter_count
from disp_runner.models.mdlm.modeling import MDLMForMaskedDiffusion
from disp_runner.models.mdlm.processing import MDLMProcessor
from disp_runner.models.mdlm.tokenization import SpecialTokens

AutoConfig.register(MDLMConfig.model_type, MDLMConfig, exist_ok=True)
AutoModel.register(MDLMConfig, MDLMForMaskedDiffusion, exist_ok=True)

FAMILY = ModelFamily(
    model_type=MDLMConfig.model_type,
    model_class=MDLMForMaskedDiffusion,
    processor_class=MDLMProcessor,
    positive_sizes=("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings", "image_size", "patch_size", "num_channels", "vision_hidden_size",
                    "vision_num_layers", "vision_num_heads", "vision_intermediate_size"),
    required_tokens=(SpecialTokens.MASK, SpecialTokens.EOS, SpecialTokens.PAD, SpecialTokens.IMAGE),
    parameter_count=parameter_count,
)


def build_model(tokenizer: PreTrainedTokenizerBase, **size: int) -> tuple[MDLMForMaskedDiffusion, MDLMProcessor]:
    """A freshly initialised MDLM whose special-token ids come from `tokenizer`, and its processor."""
    config = MDLMConfig(
        vocab_size=len(tokenizer),
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        image_token_id=tokenizer.convert_tokens_to_ids(SpecialTokens.IMAGE),
        **size,
    )
    return MDLMForMaskedDiffusion(config), MDLMProcessor(tokenizer, config)


__all__ = ["FAMILY", "MDLMConfig", "MDLMForMaskedDiffusion", "MDLMProcessor", "build_model"]
