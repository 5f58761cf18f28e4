"""`iat serve ranking|source|sequencer|trainer`: run one service in the foreground.

Every option defaults to the environment (services.config.Settings); flags override it.
"""
from __future__ import annotations

import argparse
import importlib
import logging

from services.config import Settings

# service -> (module with serve(settings, host, port), the Settings field of its HTTP port)
SERVICES = {
    "ranking": ("services.ranking.main", "ranking_http_port"),
    "source": ("services.source.main", "source_http_port"),
    "sequencer": ("services.sequencer.main", "sequencer_http_port"),
    "trainer": ("services.trainer.main", "trainer_http_port"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("service", choices=sorted(SERVICES))
    parser.add_argument("--host", help="bind address (default IAT_HOST, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default: the service's IAT_*_HTTP_PORT)")
    parser.add_argument("--grpc-port", type=int, help="ranking only: gRPC port (default IAT_RANKING_GRPC_PORT)")
    parser.add_argument("--redis-url", help="default REDIS_URL; unset: embedded Redis")
    parser.add_argument("--model-dir", help="default IAT_MODEL_DIR")
    parser.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module_name, port_field = SERVICES[args.service]
    updates = {}
    if args.redis_url:
        updates["redis_url"] = args.redis_url
    if args.model_dir:
        updates["model_dir"] = args.model_dir
    if args.grpc_port is not None:
        updates["ranking_grpc_port"] = args.grpc_port
    settings = Settings().model_copy(update=updates)
    host = args.host or settings.host
    port = args.port if args.port is not None else getattr(settings, port_field)
    return int(importlib.import_module(module_name).serve(settings, host, port) or 0)
