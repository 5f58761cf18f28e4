"""gRPC router: ScoreRequest -> ScoreQuery -> serving -> ScoreResponse. No logic of its own.

Standard health checking (grpc.health.v1) and server reflection are served on the same port
so that `grpcurl` and load balancers work out of the box.
"""
from __future__ import annotations

import logging
import os
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from iat.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from services import metrics
from services.ranking.errors import ScoreError
from services.ranking.protocol import query_from_proto, result_to_proto
from services.ranking.wire import ScoreRequestWire
from services.security import BearerTokenInterceptor

log = logging.getLogger(__name__)
SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name
# Which of several worker processes on the port answered (IAT_RANKING_WORKERS).
WORKER_PID_KEY = "iat-worker-pid"


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    def __init__(self, serving):
        self.serving = serving

    async def Score(self, request, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        status = "OK"
        try:
            query = query_from_proto(request)
            result = await self.serving.score(query, timeout_s=context.time_remaining())
            context.set_trailing_metadata(((WORKER_PID_KEY, str(os.getpid())),))
            return result_to_proto(result)
        except ScoreError as err:
            status = err.grpc_code.name
            await context.abort(err.grpc_code, str(err))
        except Exception:
            status = "INTERNAL"
            log.exception("Score failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            metrics.SCORE_LATENCY.labels("grpc", status).observe(time.perf_counter() - start)


def add_ranking_servicer(servicer: RankingServicer, server: grpc.aio.Server) -> None:
    """``ranking_pb2_grpc.add_RankingServiceServicer_to_server`` with one difference: Score's
    request is read as a ScoreRequestWire (services/ranking/wire.py: the same message, its
    candidates left as wire bytes), so no Python runs per candidate before the item cache."""
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score,
            request_deserializer=ScoreRequestWire.FromString,
            response_serializer=ranking_pb2.ScoreResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def start_grpc_server(serving, host: str, port: int, reuse_port: bool = False) -> tuple[grpc.aio.Server, int]:
    """Start the aio server; return it and the bound port (port 0 picks a free one).

    ``reuse_port``: bind with SO_REUSEPORT, so that the other workers of this service bind the
    same port and the kernel spreads connections among them; off, a port already taken is an
    error instead of a silent share with whoever holds it.

    A message over IAT_GRPC_MAX_RECEIVE_BYTES is refused by gRPC itself (RESOURCE_EXHAUSTED)
    before it is parsed; with IAT_API_TOKEN set, Score needs ``authorization: Bearer <token>``.
    """
    token = serving.settings.token
    server = grpc.aio.server(
        interceptors=[BearerTokenInterceptor(token)] if token else None,
        options=[
            ("grpc.max_receive_message_length", serving.settings.grpc_max_receive_bytes),
            ("grpc.so_reuseport", int(reuse_port)),
        ],
    )
    add_ranking_servicer(RankingServicer(serving), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.health_servicer = health_servicer  # so shutdown can flip to NOT_SERVING first
    return server, bound
