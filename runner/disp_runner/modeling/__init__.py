"""The built-in MDLM (LLaDA-V shape) as a transformers model, registered with the Auto classes."""

from transformers import AutoConfig, AutoModel

from disp_runner.modeling.configuration_mdlm import MDLMConfig
from disp_runner.modeling.modeling_mdlm import MDLMForMaskedDiffusion

AutoConfig.register(MDLMConfig.model_type, MDLMConfig, exist_ok=True)
AutoModel.register(MDLMConfig, MDLMForMaskedDiffusion, exist_ok=True)

__all__ = ["MDLMConfig", "MDLMForMaskedDiffusion"]
