"""Per task: the request item, the options and the result. Field names follow transformers' pipelines."""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TaskName(str, Enum):
    sentiment = "sentiment"
    ner = "ner"
    qa = "qa"
    fill_mask = "fill_mask"
    nsp = "nsp"
    embedding = "embedding"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- request items -------------------------------------------------------------------------------


class TextItem(_Strict):
    """One text: sentiment, ner, fill_mask and embedding."""

    text: str


class QAItem(_Strict):
    question: str
    context: str


class PairItem(_Strict):
    """Next-sentence prediction: does ``text_pair`` follow ``text``?"""

    text: str
    text_pair: str


# ---- options ---------------------------------------------------------------------------------------


class SentimentOptions(_Strict):
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


class EmbeddingOptions(_Strict):
    pooling: Literal["mean", "cls", "pooler"] = "mean"
    normalize: bool = Field(True, description="L2-normalise the pooled vector.")
    return_tokens: bool = Field(False, description="Also return each token's contextual vector.")


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


class TokenVector(_Strict):
    token: str
    start: int
    end: int
    vector: list[float]


class EmbeddingResult(_Strict):
    embedding: list[float]
    tokens: list[TokenVector] | None = None
    truncated: bool = False


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
}
