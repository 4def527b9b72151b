from __future__ import annotations

from pydantic import Field

from .base import Section


class RayConfig(Section):
    """How to reach Ray. With no address (and no RAY_ADDRESS) zhchat joins the cluster this
    machine is part of (`ray start`), else starts a local one."""

    address: str | None = Field(None, description="Ray address; None: RAY_ADDRESS, else the running cluster this "
                                "machine is part of, else a new local cluster; 'local': always a new local cluster")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local cluster (None: all)")
    num_gpus: int | None = Field(None, ge=0, description="GPUs for a local cluster (None: detect)")
    # On by default: Ray Train's placement-group cleaner and `ray job submit` use the state
    # API the dashboard serves (without it Train logs a warning every few seconds). It costs
    # about 1 GB of RAM; turn it off on very small machines.
    include_dashboard: bool = Field(True, description="Start the Ray dashboard with a local cluster (~1 GB RSS)")
    # Ray's own high-throughput Serve mode (Ray >= 2.55, zhchat.runtime.high_throughput_serve_env):
    # HAProxy answers HTTP and hands requests to the FastAPI ingress replicas' own ports instead
    # of the Python proxy actor, replicas talk over direct gRPC, and user code runs on the
    # replica's event loop. On the serve benchmark it cut time to first token over HTTP and
    # raised tokens/s at 16 clients. It must be in the environment of every Ray process, so it
    # applies to the local cluster zhchat starts; on a cluster set it in the cluster's
    # environment (see deploy/).
    serve_throughput_optimized: bool = Field(
        True, description="Ray's high-throughput Serve mode (HAProxy ingress, direct gRPC) for a local cluster this command starts")
