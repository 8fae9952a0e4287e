"""OpenAI-compatible ``POST /v1/embeddings``: one embedding job per request, waited for.

``model`` is the configured embedding model (BERTQ_MODEL_EMBEDDING) or one BERTQ_ALLOWED_MODELS
permits. ``usage`` counts no tokens: job records do not carry token counts, and the gateway has no
tokenizer (it loads no model), so ``prompt_tokens`` and ``total_tokens`` are 0 rather than a guess.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from bertq.gateway.checks import checked_model, checked_texts
from bertq.gateway.errors import ErrorAnswer
from bertq.gateway.state import GatewayState
from bertq.gateway.waited import STATUSES, item_failed, results_of, workers_model
from bertq.schemas import TaskName

router = APIRouter()


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request. Token arrays as ``input`` are not supported: send texts."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="BERTQ_MODEL_EMBEDDING's hub id or path, or a model BERTQ_ALLOWED_MODELS permits.")
    input: str | list[str] = Field(description="A text or a list of texts (at most BERTQ_MAX_ITEMS_PER_JOB).")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="`base64`: each embedding is the base64 of its little-endian float32 bytes."
    )
    dimensions: int | None = Field(
        None, ge=1, description="Keep the first `dimensions` components, normalised (at most the model's size)."
    )
    user: str | None = Field(None, description="Accepted, as OpenAI's; not used.")

    @field_validator("input", mode="before")
    @classmethod
    def _texts_only(cls, value: Any) -> Any:
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(text, str) for text in value)):
            return value
        raise PydanticCustomError(
            "input_type", "must be a string or a list of strings (token arrays are not supported)"
        )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str = Field(description="Floats, or a base64 string with encoding_format base64.")
    index: int


class Usage(BaseModel):
    prompt_tokens: int = Field(description="0: job records carry no token counts (see README, HTTP gateway).")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingsResponse,
    responses={status: {"model": ErrorAnswer} for status in STATUSES},
)
async def create_embeddings(request: EmbeddingsRequest, state: GatewayState) -> JSONResponse:
    """Embed the texts of ``input`` through the queue and wait, at most BERTQ_HTTP_TIMEOUT_S
    (then 504 with the job id to poll at ``GET /v1/jobs/{id}``)."""
    settings = state.settings
    texts = [request.input] if isinstance(request.input, str) else request.input
    items = checked_texts(settings, texts)
    checked_model(settings, TaskName.embedding, request.model)
    options = {"encoding": request.encoding_format, "dimensions": request.dimensions}
    model = workers_model(state, "embedding", request.model)
    job_id, results = await results_of(state, "embedding", items, model, options)
    data = []
    for index, result in enumerate(results):
        if "error" in result:
            raise item_failed(job_id, result["error"], f"input[{index}]")
        data.append({"object": "embedding", "embedding": result["embedding"], "index": index})
    usage = {"prompt_tokens": 0, "total_tokens": 0}
    return JSONResponse({"object": "list", "data": data, "model": request.model, "usage": usage})
