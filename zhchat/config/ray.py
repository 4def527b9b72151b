from __future__ import annotations

from pydantic import Field

from .base import Section


class RayConfig(Section):
    """How to reach Ray. With no address (and no RAY_ADDRESS) a local cluster is started."""

    address: str | None = Field(None, description="Ray address; None uses RAY_ADDRESS or starts a local cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local cluster (None: all)")
    num_gpus: int | None = Field(None, ge=0, description="GPUs for a local cluster (None: detect)")
    # On by default: Ray Train's placement-group cleaner and `ray job submit` use the state
    # API the dashboard serves (without it Train logs a warning every few seconds). It costs
    # about 1 GB of RAM; turn it off on very small machines.
    include_dashboard: bool = Field(True, description="Start the Ray dashboard with a local cluster (~1 GB RSS)")
