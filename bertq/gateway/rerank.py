"""``POST /v1/rerank`` in text-embeddings-inference's request and response shape: a query and texts in,
the texts' indexes and scores out, best first. One rerank job of one item, waited for; the scores are
the rerank task's (``CrossEncoder.predict``'s, or its logits with ``raw_scores``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from bertq.gateway.checks import checked_model, checked_rerank
from bertq.gateway.errors import ErrorAnswer
from bertq.gateway.state import GatewayState
from bertq.gateway.waited import STATUSES, item_failed, results_of, workers_model
from bertq.schemas import TaskName

router = APIRouter()


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str
    texts: list[str] = Field(description="The documents to score against the query (at most BERTQ_MAX_CANDIDATES).")
    raw_scores: bool = Field(False, description="The logits instead of the activation CrossEncoder.predict applies.")
    return_text: bool = Field(False, description="Each answer also carries its text.")
    model: str | None = Field(None, description="Default BERTQ_MODEL_RERANK; else one BERTQ_ALLOWED_MODELS permits.")


class Rank(BaseModel):
    index: int = Field(description="Position of the text in `texts`.")
    score: float
    text: str | None = Field(None, description="With return_text.")


@router.post("/v1/rerank", response_model=list[Rank], responses={status: {"model": ErrorAnswer} for status in STATUSES})
async def rerank(request: RerankRequest, state: GatewayState) -> JSONResponse:
    """Score every text against the query through the queue, best first; waited for at most
    BERTQ_HTTP_TIMEOUT_S (then 504 with the job id to poll)."""
    item = checked_rerank(state.settings, request.query, request.texts)
    checked_model(state.settings, TaskName.rerank, request.model)
    model = workers_model(state, "rerank", request.model)
    job_id, (result,) = await results_of(state, "rerank", [item], model, {"raw_scores": request.raw_scores})
    if "error" in result:
        raise item_failed(job_id, result["error"], "texts")
    ranks = []
    for ranked in result["ranked"]:
        rank = {"index": ranked["index"], "score": ranked["score"]}
        if request.return_text:
            rank["text"] = request.texts[ranked["index"]]
        ranks.append(rank)
    return JSONResponse(ranks)
