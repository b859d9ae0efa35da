"""The baseline server for `python -m bench service --naive`: FastAPI plus one transformers forward per request.

What a few lines of FastAPI around a PyTorch reward model look like: a plain sync endpoint (FastAPI runs it
in its thread pool), each request's items tokenized and run as one padded batch, no batching across requests.
Same backbone, heads, input policy and /v1/score request/response shape as the artifact the service serves.

    python -m bench.naive_server --artifact build/demo/artifact --port 8001
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pydantic import BaseModel, Field

from polyreward.models.runtime.items import Item, PromptItem

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ScoreRequest(BaseModel):
    items: list[Item] = Field(min_length=1)


def create_app(artifact: str | os.PathLike):
    from fastapi import FastAPI
    from transformers import PreTrainedTokenizerFast

    from polyreward.models.runtime.artifact import HEADS_FILE, TOKENIZER_DIR, load_manifest
    from polyreward.models.runtime.builder import InputBuilder
    from polyreward.models.runtime.scorer import ScoreResult
    from polyreward.models.torch.heads import load_heads
    from polyreward.models.torch.reward_model import build_reward_model, load_backbone, score_torch

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(artifact / TOKENIZER_DIR)
    builder = InputBuilder(tokenizer, manifest.backbone.kind, manifest.input)
    _, backbone, _ = load_backbone(manifest.backbone.id)
    model = build_reward_model(backbone, load_heads(artifact / HEADS_FILE), manifest.backbone.kind)
    padding_side = manifest.input.padding_side
    score_torch(model, builder.build([PromptItem(prompt="warm up", response="ok")]), pad_id=builder.pad_id)

    app = FastAPI(title="naive reward server")

    @app.post("/v1/score")
    def score(body: ScoreRequest) -> dict:
        encoded = builder.build(body.items)
        outputs = score_torch(model, encoded, pad_id=builder.pad_id, padding_side=padding_side)
        results = []
        for row, e in enumerate(encoded):
            r = ScoreResult.from_outputs(e, {k: v[row] for k, v in outputs.items()})
            results.append(
                {"score": r.score, "rewards": r.rewards, "gating": r.gating, "tokens": r.tokens,
                 "truncated": r.truncated}
            )  # fmt: skip
        return {"model": manifest.name, "objectives": manifest.objective_names, "results": results}

    @app.get("/ready")
    def ready() -> dict:
        return {"status": "ready"}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_server", description=__doc__)
    parser.add_argument("--artifact", default="build/demo/artifact")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)

    import uvicorn

    uvicorn.run(create_app(args.artifact), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
