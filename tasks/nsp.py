"""Next-sentence prediction on a text pair with BERT's NSP head, whose label 0 is IsNext. Pairs too
long for the model are cut longest-first, as the tokenizer does for pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bertq.schemas import NspOptions, NspResult, PairItem, TaskName
from bertq.tasks.base import Batch, Loaded, Row, cap_chars, chars_for_tokens

from bertq.errors import BertqError

IS_NEXT = 0


class NspTask:
    name = TaskName.nsp
    model_class = "BertForNextSentencePrediction"

    def on_load(self, loaded: Loaded, local_dir: Path | None) -> None:
        pass

    def preprocess(self, loaded: Loaded, items: list[PairItem], options: NspOptions) -> list[list[Row] | BertqError]:
        limit = chars_for_tokens(loaded.max_length)
        texts, texts_cut = zip(*(cap_chars(item.text, limit) for item in items))
        pairs, pairs_cut = zip(*(cap_chars(item.text_pair, limit) for item in items))
        encoded = loaded.tokenizer(list(texts), list(pairs), truncation="longest_first", max_length=loaded.max_length)
        rows: list[list[Row] | BertqError] = []
        for i, encoding in enumerate(encoded.encodings):
            truncated = texts_cut[i] or pairs_cut[i] or bool(encoding.overflowing)
            rows.append([Row(i, list(encoding.ids), list(encoding.type_ids), meta=truncated)])
        return rows

    def forward(self, loaded: Loaded, batch: Batch) -> list[Any]:
        logits = loaded.model(**batch.model_inputs()).logits.float()
        return logits.softmax(-1)[:, IS_NEXT].cpu().tolist()

    def postprocess(
        self, loaded: Loaded, item: PairItem, options: NspOptions, rows: list[Row], outputs: list[Any]
    ) -> NspResult:
        (row,), (score,) = rows, outputs
        # with two labels, IsNext wins the argmax exactly when its probability reaches one half
        return NspResult(is_next=score >= 0.5, score=score, truncated=row.meta)


TASK = NspTask()
