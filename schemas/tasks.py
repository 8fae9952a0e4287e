"""Per task: the request item, the options and the result. Field names follow transformers' pipelines."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, RootModel, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError


class TaskName(str, Enum):
    sentiment = "sentiment"
    ner = "ner"
    qa = "qa"
    fill_mask = "fill_mask"
    nsp = "nsp"
    embedding = "embedding"
    similarity = "similarity"
    summarize = "summarize"
    rerank = "rerank"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- request items -------------------------------------------------------------------------------


class TextItem(_Strict):
    """One text: sentiment, ner, fill_mask, embedding and summarize."""

    text: str


class QAItem(_Strict):
    question: str
    context: str


class PairItem(_Strict):
    """Next-sentence prediction: does ``text_pair`` follow ``text``?"""

    text: str
    text_pair: str


class SimilarityPair(_Strict):
    """Similarity of two texts: the cosine of their embeddings."""

    text_a: str
    text_b: str


class SimilarityQuery(_Strict):
    """A query and the candidates to rank by the cosine of their embeddings with the query's."""

    query: str
    candidates: list[str] = Field(min_length=1, description="At most BERTQ_MAX_CANDIDATES texts.")
    top_k: int | None = Field(None, ge=1, description="Keep the k best candidates (default: all, ranked).")


class RerankItem(_Strict):
    """A query and the documents a cross-encoder scores against it, each pair in one input."""

    query: str
    documents: list[str] = Field(min_length=1, description="At most BERTQ_MAX_CANDIDATES texts.")
    top_k: int | None = Field(None, ge=1, description="Keep the k best documents (default: all, ranked).")


SIMILARITY_SHAPES = (
    'either a pair {"text_a", "text_b"} or a query with candidates {"query", "candidates", "top_k" (optional)}'
)


def _similarity_shape(item: Any) -> str | None:
    """Which shape an item means, by its fields; None (a clear error) when it mixes or lacks both."""
    if not isinstance(item, dict):
        return None
    pair = "text_a" in item or "text_b" in item
    query = "query" in item or "candidates" in item or "top_k" in item
    return None if pair == query else "pair" if pair else "query"


class SimilarityItem(
    RootModel[
        Annotated[
            Annotated[SimilarityPair, Tag("pair")] | Annotated[SimilarityQuery, Tag("query")],
            Discriminator(
                _similarity_shape,
                custom_error_type="item_shape",
                custom_error_message=f"a similarity item is {SIMILARITY_SHAPES}",
            ),
        ]
    ]
):
    """A similarity item of either shape. Validation hands the task the shape itself (``.root``)."""


# ---- options ---------------------------------------------------------------------------------------


class LongTextOptions(_Strict):
    """How a text over the model's window is read (embedding, similarity, sentiment)."""

    long_text: Literal["truncate", "chunk"] = Field(
        "truncate",
        description="truncate: its first window only; chunk: every window, the result their token-weighted mean.",
    )
    chunk_overlap: int = Field(32, ge=0, description="Tokens each window shares with the previous one (chunk).")


class SentimentOptions(LongTextOptions):
    top_k: int | None = Field(None, ge=1, description="Keep only the k most likely labels in `scores`.")


class NerOptions(_Strict):
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = "simple"


class QAOptions(_Strict):
    top_k: int = Field(1, ge=1, description="Number of answers in `answers`.")
    doc_stride: int = Field(128, ge=1, description="Overlap in tokens between windows of a long context.")
    max_answer_len: int = Field(15, ge=1, description="Longest answer, in tokens.")
    max_seq_len: int = Field(384, ge=32, description="Window length in tokens, question included.")
    max_question_len: int = Field(64, ge=1)
    handle_impossible_answer: bool = Field(False, description="Allow the empty answer (SQuAD 2 style).")


class FillMaskOptions(_Strict):
    top_k: int = Field(5, ge=1)
    targets: list[str] | None = Field(None, min_length=1, description="Score only these candidate tokens.")


class NspOptions(_Strict):
    pass


VectorEncoding = Literal["float", "base64", "float16", "int8", "binary"]


class EmbeddingOptions(LongTextOptions):
    pooling: Literal["mean", "cls", "pooler"] = "mean"
    normalize: bool = Field(True, description="L2-normalise the pooled vector (after the cut to `dimensions`).")
    return_tokens: bool = Field(False, description="Also return each token's contextual vector.")
    dimensions: int | None = Field(
        None,
        ge=1,
        description="Keep the first d components (Matryoshka models), then normalise; at most the model's size.",
    )
    encoding: VectorEncoding = Field(
        "float",
        description=(
            "How vectors are written: float (a list), base64 (little-endian float32 bytes, as OpenAI's API), "
            "float16 (base64 of little-endian float16), int8 (a list of round(127·x), saturating at ±127), "
            "binary (the bits x > 0 packed big-endian into bytes, base64; sentence-transformers' ubinary)."
        ),
    )

    @model_validator(mode="after")
    def _tokens_of_one_window(self) -> EmbeddingOptions:
        if self.return_tokens and self.long_text == "chunk":
            raise PydanticCustomError(
                "option_conflict", "return_tokens needs long_text: truncate (token vectors are per window)"
            )
        return self


class SimilarityOptions(LongTextOptions):
    pooling: Literal["mean", "cls", "pooler"] = Field("mean", description="As the embedding task's.")


class RerankOptions(_Strict):
    raw_scores: bool = Field(
        False,
        description="Return the logits instead of the activation CrossEncoder.predict applies (the sigmoid "
        "for a one-label model, unless the checkpoint names another).",
    )


class SummarizeOptions(_Strict):
    """bert-extractive-summarizer's ``Summarizer()(text, ...)`` arguments, with its defaults."""

    num_sentences: int | None = Field(
        None, ge=1, description="Sentences in the summary, the first one included when use_first; overrides ratio."
    )
    ratio: float = Field(
        0.2,
        gt=0,
        le=1,
        description="Without num_sentences: pick max(1, int(ratio x candidate sentences)) by clustering.",
    )
    min_length: int = Field(40, ge=0, description="Candidate sentences are longer than this, in characters.")
    max_length: int = Field(600, ge=2, description="Candidate sentences are shorter than this, in characters.")
    use_first: bool = Field(True, description="Always keep the first candidate sentence.")

    @field_validator("max_length")
    @classmethod
    def _room_between_lengths(cls, max_length: int, info: Any) -> int:
        min_length = info.data.get("min_length")
        if min_length is not None and max_length <= min_length + 1:
            raise PydanticCustomError(
                "length_range",
                "must be at least min_length + 2 ({minimum}): a candidate sentence is longer than min_length "
                "and shorter than max_length",
                {"minimum": min_length + 2},
            )
        return max_length


# ---- results -------------------------------------------------------------------------------------


class LabelScore(_Strict):
    label: str
    score: float


class SentimentResult(_Strict):
    label: str
    score: float
    scores: list[LabelScore] = Field(
        description="Every label's probability (raw output for regression heads), most likely first."
    )
    truncated: bool = False
    chunks: int | None = Field(None, description="Windows whose mean this is (long_text: chunk).")


class NerEntity(_Strict):
    entity_group: str = Field(description="The entity label (with aggregation `none`: the token's label).")
    score: float
    word: str
    start: int = Field(description="Character offset into the original text.")
    end: int
    index: int | None = Field(None, description="Token index, with aggregation `none` only.")


class NerResult(_Strict):
    entities: list[NerEntity]


class QASpan(_Strict):
    answer: str
    score: float
    start: int = Field(description="Character offset into the context.")
    end: int


class QAResult(QASpan):
    answers: list[QASpan] = Field(description="The top_k best spans, best first.")


class MaskPrediction(_Strict):
    token: int
    token_str: str
    score: float
    sequence: str


class FillMaskResult(_Strict):
    masks: list[list[MaskPrediction]] = Field(description="One list of predictions per mask token.")
    truncated: bool = False


class NspResult(_Strict):
    is_next: bool
    score: float = Field(description="Probability that text_pair follows text.")
    truncated: bool = False


# A vector as the embedding task's `encoding` option writes it: floats, int8 steps, or base64 bytes.
Vector = list[int] | list[float] | str


class TokenVector(_Strict):
    token: str
    start: int
    end: int
    vector: Vector


class EmbeddingResult(_Strict):
    embedding: Vector
    tokens: list[TokenVector] | None = None
    truncated: bool = False
    chunks: int | None = Field(None, description="Windows whose mean this is (long_text: chunk).")


class SimilarityScore(_Strict):
    """A pair's result."""

    score: float = Field(description="Cosine similarity of the two texts' embeddings, -1 to 1.")
    truncated: bool = Field(False, description="A text was cut to the model's window.")
    chunks: int | None = Field(None, description="Windows of both texts (long_text: chunk).")


class CandidateScore(_Strict):
    index: int = Field(description="Position of the candidate in the item's `candidates`.")
    score: float = Field(description="Cosine similarity with the query.")


class SimilarityRanking(_Strict):
    """A query's result."""

    ranked: list[CandidateScore] = Field(
        description="The top_k candidates, best first (equal scores: lower index first)."
    )
    truncated: bool = Field(False, description="The query or a candidate was cut to the model's window.")
    chunks: int | None = Field(None, description="Windows of the query and every candidate (long_text: chunk).")


class SimilarityResult(RootModel[SimilarityScore | SimilarityRanking]):
    """A pair gives a score, a query a ranking."""


class SummarySentence(_Strict):
    index: int = Field(description="Position among all the text's sentences (before the length filter).")
    text: str
    start: int = Field(description="Character offset into the original text.")
    end: int


class SummarizeResult(_Strict):
    summary: str = Field(description="The chosen sentences joined by single spaces.")
    sentences: list[SummarySentence] = Field(description="The chosen sentences, in text order.")
    truncated: bool = Field(False, description="A candidate sentence was cut to the model's window.")


class DocumentScore(_Strict):
    index: int = Field(description="Position of the document in the item's `documents`.")
    score: float


class RerankResult(_Strict):
    ranked: list[DocumentScore] = Field(
        description="The top_k documents, best first (equal scores: lower index first)."
    )
    truncated: bool = Field(False, description="A document was cut to fit the model's window beside the query.")


class TaskContract(BaseModel):
    item: type[BaseModel]
    options: type[BaseModel]
    result: type[BaseModel]


CONTRACTS: dict[TaskName, TaskContract] = {
    TaskName.sentiment: TaskContract(item=TextItem, options=SentimentOptions, result=SentimentResult),
    TaskName.ner: TaskContract(item=TextItem, options=NerOptions, result=NerResult),
    TaskName.qa: TaskContract(item=QAItem, options=QAOptions, result=QAResult),
    TaskName.fill_mask: TaskContract(item=TextItem, options=FillMaskOptions, result=FillMaskResult),
    TaskName.nsp: TaskContract(item=PairItem, options=NspOptions, result=NspResult),
    TaskName.embedding: TaskContract(item=TextItem, options=EmbeddingOptions, result=EmbeddingResult),
    TaskName.similarity: TaskContract(item=SimilarityItem, options=SimilarityOptions, result=SimilarityResult),
    TaskName.summarize: TaskContract(item=TextItem, options=SummarizeOptions, result=SummarizeResult),
    TaskName.rerank: TaskContract(item=RerankItem, options=RerankOptions, result=RerankResult),
}


def item_shapes(task: TaskName) -> list[type[BaseModel]]:
    """The models of the item shapes a task takes: one, or for an item that is a union of shapes
    (similarity: a pair or a query), each member."""
    model = CONTRACTS[task].item
    if not issubclass(model, RootModel):
        return [model]
    found: list[type[BaseModel]] = []

    def walk(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.append(annotation)
            return
        for argument in get_args(annotation):
            walk(argument)

    walk(model.model_fields["root"].annotation)
    return found
