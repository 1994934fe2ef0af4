"""Which model families this runner loads, chosen by config.json's `model_type`.

A family is added by writing its folder under disp_runner/models/ (model, processor, a
`ModelFamily` record) and listing it here; docs/development.md "Adding a model family" walks through it.
"""

from __future__ import annotations

from transformers import AutoConfig

from disp_runner.errors import UserInputError
from disp_runner.models import llada_v, mdlm
from disp_runner.models.base import ModelFamily

# model_type -> family: what `load_model` can load.
FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> None:
    """Make `family` loadable (registering the same model_type again replaces it). Its config class
    is made known to transformers' AutoConfig too, which reads config.json when a tokenizer loads."""
    AutoConfig.register(family.model_type, family.model_class.config_class, exist_ok=True)
    FAMILIES[family.model_type] = family


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_for(model_type: object, where: str) -> ModelFamily:
    """The family of `model_type`, or a UserInputError naming `where` and what is supported."""
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise UserInputError(f"{where}: model_type is {model_type!r}; this runner loads "
                             f"{', '.join(repr(t) for t in supported_model_types())} models "
                             "(remote code is never enabled)")
    return family


register_family(mdlm.FAMILY)
register_family(llada_v.FAMILY)
