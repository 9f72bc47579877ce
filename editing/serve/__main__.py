"""``python -m editing.serve``: start the DragCanvas deployment and keep it up until Ctrl-C / SIGTERM.

    python -m editing.serve --model tiny --replicas 2                  # local Ray cluster on this machine
    python -m editing.serve --address 10.0.0.5:6379 --replicas 8 --gpus-per-replica 1   # join a cluster

Stopping drains: running edits finish (up to --drain-s) before the replicas go.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

log = logging.getLogger("dragcanvas.serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m editing.serve",
                                description="Serve the DragCanvas engine on Ray Serve (one Editor per replica).")
    p.add_argument("--model", default="auto", help="model spec, as for app.py (default: auto)")
    p.add_argument("--replicas", type=int, default=1, help="Editors to run (default: 1)")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs per replica, fractions allowed (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs reserved per replica (default: 1)")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (HOST:PORT or 'auto'); default: start a local one")
    p.add_argument("--app", default=None, help="Serve application name (default: dragcanvas)")
    p.add_argument("--max-ongoing", type=int, default=4,
                   help="requests that may wait at one replica; more keeps images on their replica under load, "
                        "fewer spreads load sooner (default: 4)")
    p.add_argument("--drain-s", type=float, default=300.0,
                   help="on shutdown, wait this long for running edits (default: 300)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per replica (default: Ray's)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickle weights (only for files you trust)")
    p.add_argument("--offload", action="store_true", help="model CPU offload inside each replica (low VRAM)")
    p.add_argument("--max-side", type=int, default=2048, help="downscale larger uploads to this long side")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        import ray
        from ray import serve
    except ImportError:
        log.error("Ray Serve is not installed: pip install -r requirements-ray.txt")
        return 2
    from editing.serve import APP_NAME, cluster
    from models.errors import EditError

    app = args.app or APP_NAME
    started = False
    try:
        started = cluster.connect(args.address, replica_logs=True)
        gpus = args.gpus_per_replica
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        cluster.deploy(args.model, replicas=args.replicas, gpus_per_replica=gpus,
                       cpus_per_replica=args.cpus_per_replica, app=app, max_ongoing=args.max_ongoing,
                       drain_s=args.drain_s, threads=args.threads,
                       engine={"allow_pickle": args.allow_pickle, "offload": args.offload,
                               "max_side": args.max_side})
    except EditError as e:
        log.error("%s", e)
        if ray.is_initialized():
            ray.shutdown()
        return 2
    where = ray.get_runtime_context().gcs_address
    log.info("DragCanvas: %d replica(s) of %s (%g GPU each) as Serve app %r on the Ray cluster at %s. "
             "Front end: python app.py --backend ray%s", args.replicas, args.model, gpus, app, where,
             "" if started else f":{where}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping: waiting up to %.0f s for running edits", args.drain_s)
    serve.delete(app)  # Serve drains each replica (graceful_shutdown_timeout_s) before it stops
    if started:
        serve.shutdown()
        ray.shutdown()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
