"""`progress.json`: what a running stage reports about itself, overwritten in the run folder (and
its S3 prefix) while the stage works. The runner writes it, the operator reads it into status
(progress, the stage's ETA) and the stall alert's timestamp; both go through this one model."""

from __future__ import annotations

from datetime import datetime
from typing import Optional

from pydantic import Field

from disp_api.base import ContractModel
from disp_api.spec import StageName


class StageProgress(ContractModel):
    stage: StageName
    """The stage that is running."""
    shard: Optional[str] = None
    """Which shard of a sharded stage (`<i>-of-<N>`), or none."""
    fraction: float = Field(ge=0.0, le=1.0)
    """Share of the stage's items done."""
    items_done: int = Field(0, ge=0)
    """Items done so far (images, instances, fine-tune steps)."""
    items_total: int = Field(0, ge=0)
    """Items the stage has in all (0 while not known yet)."""
    eta_seconds: Optional[float] = Field(None, ge=0.0)
    """Time the stage has left at the rate this pod has managed so far; none before any item."""
    updated_at: Optional[datetime] = None
    """When this report was written (UTC)."""
