"""Base model of every contract: camelCase on the wire, snake_case in Python, unknown fields are
errors, instances are immutable."""

from dataclasses import dataclass
from typing import Annotated, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

# Seeds are 32-bit, as numpy's: sub-seeds derived from them (seed * a large prime + k) must stay
# inside the 64 bits torch's generators take, and the CRD must refuse what the runner would.
SEED_MAX = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class ContractModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,  # NaN and infinity are never a valid setting or result
    )

    def to_wire(self) -> dict:
        """JSON-ready dict with camelCase keys, as written to files and Kubernetes objects."""
        return self.model_dump(mode="json", by_alias=True)


@dataclass(frozen=True)
class FieldError:
    """The first error of a failed validation, as a user should read it."""

    loc: list[Union[str, int]]  # path to the bad field (pydantic's validator-function parts dropped)
    message: str  # "unknown field" for a misspelt key, pydantic's message otherwise, "(and N more)"

    @classmethod
    def first_of(cls, exc: ValidationError) -> "FieldError":
        err = exc.errors()[0]
        loc = [part for part in err["loc"] if not (isinstance(part, str) and part.startswith("function-"))]
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] == "value_error":  # a validator's own sentence, without pydantic's prefix
            message = message.removeprefix("Value error, ")
        if exc.error_count() > 1:
            message += f" (and {exc.error_count() - 1} more)"
        return cls(loc, message)

    @property
    def field(self) -> str:
        return ".".join(str(part) for part in self.loc)


def with_cel_rules(*rules: tuple[str, str]) -> ConfigDict:
    """A model's config carrying its cross-field rules in CEL, as `x-kubernetes-validations` in the
    CRD generated from these models: the API server refuses at `kubectl apply` what the model's
    own validator refuses in `disp run`. Each (rule, message); the message names the field, and the
    API server prefixes the path of the object the rule sits on."""
    return ContractModel.model_config | ConfigDict(json_schema_extra={
        "x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]})
