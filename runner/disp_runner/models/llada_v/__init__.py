"""LLaDA-V (`GSAI-ML/LLaDA-V`, model_type "llava_llada"), natively: no remote code."""

from disp_runner.models.base import ModelFamily
from disp_api.model_shapes import llada_v_shape
from disp_runner.models.llada_v.configuration import LladaVConfig, config_for_weights, parameter_count
from disp_runner.models.llada_v.modeling import LladaVForMaskedDiffusion
from disp_runner.models.llada_v.processing import LladaVProcessor, Specials

FAMILY = ModelFamily(
    model_type=LladaVConfig.model_type,
    model_class=LladaVForMaskedDiffusion,
    processor_class=LladaVProcessor,
    positive_sizes=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings"),
    required_tokens=Specials.ALL,
    key_mapping=LladaVForMaskedDiffusion.ORIGINAL_LLADA_KEYS,
    parameter_count=parameter_count,
    config_for_weights=config_for_weights,
    native_for_auto_map=True,  # GSAI-ML/LLaDA-V ships configuration_llada.py and an auto_map
    model_shape=llada_v_shape,
)

__all__ = ["FAMILY", "LladaVConfig", "LladaVForMaskedDiffusion", "LladaVProcessor"]
