"""Joining or starting a Ray cluster, and checking it can hold the replicas, before anything starts.

Every failure here is an ``EditError`` with one line naming what to fix; nothing is left half-started
(an unreachable address is found with a plain TCP connect before ``ray.init`` would retry for minutes).
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import ray
from ray import serve

from editing.serve import APP_NAME
from models.errors import EditError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]  # the checkout: replicas import editing/ and models/ from here
CONNECT_TIMEOUT_S = 3.0
DEFAULT_RAY_PORT = 6379
PASSED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_ENDPOINT")  # this process's settings the replicas also get


def _host_port(address: str) -> tuple[str, int]:
    bare = address.split("://", 1)[-1]
    host, _, port = bare.rpartition(":")
    if not host:  # no port given
        return bare, DEFAULT_RAY_PORT
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise EditError(f"Bad Ray address {address!r}: use HOST:PORT (e.g. 10.0.0.5:6379) or 'auto'.") from None


def check_reachable(address: str) -> None:
    """A TCP connect to the cluster's GCS port, so a wrong address fails in seconds with a clear message."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise EditError(f"No Ray cluster answers at {address} ({e.strerror or type(e).__name__}): start one with "
                        "`ray start --head` or `python -m editing.serve`, or fix the address.") from None


def connect(address: str | None = None, *, num_cpus: float | None = None, num_gpus: float | None = None,
            replica_logs: bool = False) -> bool:
    """Join the cluster at ``address`` ('auto' = the one running on this machine), or start a local one when
    ``address`` is None. Returns True when this process started the cluster. Already connected: nothing to do.
    ``replica_logs``: also print the replicas' logs here (else they are only in Ray's log folder)."""
    if ray.is_initialized():
        return False
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.update({k: os.environ[k] for k in PASSED_ENV if k in os.environ})  # e.g. offline mode reaches replicas
    common = dict(namespace="dragcanvas", log_to_driver=replica_logs, runtime_env={"env_vars": env},
                  logging_level=logging.WARNING)
    if address is None:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **common)
        return True
    if address != "auto":
        check_reachable(address)
    try:
        ray.init(address=address, **common)
    except ConnectionError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EditError(f"Could not join the Ray cluster at {address!r} ({msg}): is `ray start --head` or "
                        "`python -m editing.serve` running there?") from None
    return False


def check_capacity(replicas: int, gpus_per_replica: float, cpus_per_replica: float) -> None:
    """Refuse a deployment the cluster cannot place (Serve would wait for resources forever)."""
    if replicas < 1:
        raise EditError(f"--replicas must be at least 1 (got {replicas}).")
    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0.0), res.get("CPU", 0.0)
    if gpus_per_replica > 0 and replicas * gpus_per_replica > gpus + 1e-9:
        fix = (f"Use --replicas {int(gpus // gpus_per_replica)} or a fractional --gpus-per-replica (0.5 puts two "
               "replicas on each GPU)." if gpus >= gpus_per_replica else "Use --gpus-per-replica 0 to run on CPUs.")
        raise EditError(f"{replicas} replicas × {gpus_per_replica:g} GPU need {replicas * gpus_per_replica:g} GPUs; "
                        f"the cluster has {gpus:g}. {fix}")
    if replicas * cpus_per_replica > cpus + 1e-9:
        raise EditError(f"{replicas} replicas × {cpus_per_replica:g} CPU need {replicas * cpus_per_replica:g} CPUs; "
                        f"the cluster has {cpus:g}. Lower --replicas or --cpus-per-replica.")


def app_handle(app: str = APP_NAME):
    """The deployment's handle, or a clear message when no such application runs on the cluster."""
    status = serve.status().applications.get(app)
    if status is None:
        raise EditError(f"No DragCanvas deployment named {app!r} on this Ray cluster: start it with "
                        "`python -m editing.serve` (add --address to join this cluster).")
    if str(status.status).split(".")[-1] not in ("RUNNING", "DEPLOYING", "UPSCALING", "DOWNSCALING"):
        raise EditError(f"The DragCanvas deployment {app!r} is {status.status}: {status.message or 'see its log'}.")
    return serve.get_app_handle(app)


def app_alive(app: str = APP_NAME) -> bool:
    """False once the application is gone or being deleted (an unhealthy app is replacing replicas: alive)."""
    try:
        status = serve.status().applications.get(app)
    except Exception:
        return False
    return status is not None and str(status.status).split(".")[-1] not in ("DELETING", "DEPLOY_FAILED")


def deploy(model: str, *, replicas: int = 1, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0,
           app: str = APP_NAME, **options):
    """Start the deployment (``deployment.build_app`` options) on the connected cluster and wait until every
    replica has loaded its model; on failure, remove what was started and raise an EditError."""
    from editing.serve.deployment import build_app

    check_capacity(replicas, gpus_per_replica, cpus_per_replica)
    serve.start(proxy_location="Disabled")  # handles only: no HTTP proxy to start or to expose
    try:
        return serve.run(build_app(model, replicas=replicas, gpus_per_replica=gpus_per_replica,
                                   cpus_per_replica=cpus_per_replica, **options), name=app, route_prefix=None)
    except Exception as e:
        try:
            serve.delete(app)
        except Exception:
            pass
        lines = [ln for ln in str(e).splitlines() if "DragCanvas replica" in ln or "Error" in ln]
        raise EditError(f"The deployment did not start: {(lines or [type(e).__name__])[-1].strip()}") from None


def remove(app: str = APP_NAME) -> None:
    """Delete the application; Serve drains its replicas (running edits finish) first."""
    serve.delete(app)


def shutdown() -> None:
    """Stop Serve (draining its replicas) and leave the cluster (stopping it when this process started it)."""
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
