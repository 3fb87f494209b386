"""`wan-ray serve`: run the endpoint on the Ray cluster at hand (a new local one if none) until Ctrl-C.

For every setting (limits, autoscaling, timeouts) use `serve run configs/serve.yaml` instead.

Light at import: `wan_ray.cli` builds its parser from here without importing Ray or torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from ..runtime.topology import bundled_presets

APP_NAME = "wan"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="bundled model name or checkpoint folder (default: tiny)")
    p.add_argument("--topology", default="local",
                   help=f"resources and replicas per stage: a preset ({', '.join(bundled_presets())}) or a "
                        "YAML file")
    p.add_argument("--storage", default="wan-ray-serve",
                   help="records and videos: a folder or s3://bucket/prefix (default: ./wan-ray-serve)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="the bearer key clients must send (default: $WAN_RAY_API_KEY, comma-separated keys)")
    p.add_argument("--no-api-key", action="store_true",
                   help="serve without any key: for local use only, anyone who reaches the port may use it")


def serve_main(args: argparse.Namespace) -> int:
    from .app import ServeConfigError, build_app
    from .auth import key_digest

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    storage = args.storage if "://" in args.storage else str(Path(args.storage).resolve())
    app_args = {"model": args.model, "topology": args.topology, "storage": storage}
    key = args.api_key or os.environ.get("WAN_RAY_API_KEY")
    if args.no_api_key:
        app_args["allow_no_key"] = True
        logging.warning("serving WITHOUT an API key (--no-api-key): for local use only")
    elif not key:
        print("no API key: pass --api-key KEY or set WAN_RAY_API_KEY (or --no-api-key for local use only)",
              file=sys.stderr)
        return 2
    elif args.api_key:  # the application gets the key's digest, never the key
        app_args["api_key_sha256"] = [key_digest(k.strip()) for k in args.api_key.split(",") if k.strip()]

    import ray
    from ray import serve

    try:
        app = build_app(app_args)
    except (ServeConfigError, ValueError) as err:
        print(f"cannot serve: {err}", file=sys.stderr)
        return 2
    ray.init()  # the cluster named by RAY_ADDRESS, else a new local one
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{args.host}:{args.port}/v1/videos"
    print(f"serving {app_args['model']} at {url} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
