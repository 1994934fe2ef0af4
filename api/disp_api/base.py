"""Base model of every contract: camelCase on the wire, snake_case in Python, unknown fields are
errors, instances are immutable."""

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ContractModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> dict:
        """JSON-ready dict with camelCase keys, as written to files and Kubernetes objects."""
        return self.model_dump(mode="json", by_alias=True)
