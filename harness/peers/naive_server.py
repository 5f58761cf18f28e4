"""The naive peer: the paper's architecture served as a straightforward deployment would.

TorchScript of ``IATNaive`` (same weights as the served model; every candidate re-encodes the
user's history) behind a plain FastAPI endpoint (a sync handler, run in Starlette's thread pool),
with the same history read and featurization as the ranking service, so that what differs is
the model's shape of work and the framework around it.

    python harness/peers/naive_server.py --model-dir DIR --redis-url URL --port 8100
    POST /v1/score  (the ranking service's REST JSON)
"""

import argparse
import sys
from pathlib import Path


def create_app(model_dir: Path, redis_url: str):
    from fastapi import FastAPI

    from harness.naive import naive_ranking_model
    from models.runtime.loader import latest_version
    from services.allocator import keep_freed_memory
    from services.config import Settings
    from services.ranking.protocol import ScoreRequestModel
    from services.ranking.registry import ModelRegistry
    from services.stores import instance_store
    from storage.connection import connect

    settings = Settings(redis_url=redis_url)
    keep_freed_memory(settings.malloc_keep_mb)  # as the ranking service does
    model = naive_ranking_model(latest_version(model_dir, "iat"), trace=True)
    model.runtime = "torchscript-naive"
    store = instance_store(connect(redis_url), settings, ModelRegistry(model_dir).record_layout(model))
    app = FastAPI(title="naive IAT peer")
    app.state.model = model

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/score")
    def score(body: ScoreRequestModel) -> dict:
        history = store.read_history(body.user_id, body.request_time_ms, model.max_history,
                                     expected_source_version=model.manifest.accepted_sources())
        cat, multi, num = model.featurizer.encode(
            body.user_id, body.request_time_ms, [c.item_id for c in body.candidates],
            body.context.categorical, body.context.numeric,
            [c.features.categorical for c in body.candidates], [c.features.numeric for c in body.candidates])
        scores = model.score(history, body.request_time_ms, cat, multi, num)
        return {"request_id": body.request_id, "model": "iat-naive", "history_length": len(history),
                "tasks": list(model.tasks), "scores": scores.reshape(-1).tolist()}

    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(create_app(args.model_dir, args.redis_url), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
