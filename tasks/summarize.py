"""Extractive summaries that pick the sentences bert-extractive-summarizer picks, with each sentence a
row in the engine's batches: one long text fills batches on its own, many short ones share them.

The steps of its ``Summarizer()(text, ...)`` (version 0.10.1), which this module follows:

1. Split the text with spaCy's rule-based English sentencizer (no model). Candidates are the stripped
   sentences longer than ``min_length`` and shorter than ``max_length`` characters.
2. Embed each candidate on its own: its WordPiece tokens without [CLS] and [SEP], the hidden states of
   the second-to-last layer, averaged over the tokens.
3. With ``use_first``, keep the first candidate and cluster the others. k-means (scikit-learn, its
   defaults, ``random_state`` 12345) with ``num_sentences`` clusters (one fewer with ``use_first``),
   or ``max(1, int(ratio * candidates))``; never more clusters than candidates.
4. For each centroid in turn, the nearest candidate not taken yet. The chosen ones, in text order,
   joined by single spaces.

Where it differs: a candidate longer than the model window is embedded from its first tokens (the
result says ``truncated``) where the reference fails, a candidate with no tokens at all is skipped,
a text without candidates is an item error rather than an empty summary, and candidates equally near
a centroid (within ``TIE``) go to the earlier one where the reference follows float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bertq.schemas import SummarizeOptions, SummarizeResult, SummarySentence, TaskName, TextItem
from bertq.tasks.base import Batch, Loaded, Row, cap_chars, chars_for_tokens

from bertq.errors import BertqError, InvalidInput

#: bert-extractive-summarizer's default ``random_state``, given to k-means
RANDOM_STATE = 12345
#: its default embedding layer: hidden_states[-2], the output of all layers but the last
HIDDEN_LAYER = -2
#: distances to a centroid this close count as equal (see nearest_to_centroids)
TIE = 1e-5


@dataclass
class Candidate:
    position: int  # among the item's candidates; rows may come back to postprocess in batch order
    index: int  # among all the text's sentences
    start: int
    end: int
    truncated: bool


class SummarizeTask:
    name = TaskName.summarize
    model_class = "AutoModel"
    needs_hidden_states = True  # layer -2: served by torch whatever BERTQ_BACKEND says

    def on_load(self, loaded: Loaded, local_dir: Path | None) -> None:
        from spacy.lang.en import English

        sentencizer = English()
        sentencizer.add_pipe("sentencizer")
        loaded.extra["sentencizer"] = sentencizer

    def preprocess(
        self, loaded: Loaded, items: list[TextItem], options: SummarizeOptions
    ) -> list[list[Row] | BertqError]:
        spans = [candidate_spans(doc, options) for doc in loaded.extra["sentencizer"].pipe(item.text for item in items)]
        limit = chars_for_tokens(loaded.max_length)
        capped = [
            cap_chars(item.text[start:end], limit) for item, found in zip(items, spans) for _, start, end in found
        ]
        encoded = loaded.tokenizer(
            [text for text, _ in capped], add_special_tokens=False, truncation=True, max_length=loaded.max_length
        )
        encodings = iter(zip(encoded.encodings, capped))
        rows: list[list[Row] | BertqError] = []
        for i, found in enumerate(spans):
            item_rows: list[Row] = []
            for index, start, end in found:
                encoding, (_, cut) = next(encodings)
                if encoding.ids:
                    candidate = Candidate(len(item_rows), index, start, end, cut or bool(encoding.overflowing))
                    item_rows.append(Row(i, list(encoding.ids), None, candidate))
            if item_rows:
                rows.append(item_rows)
            else:
                rows.append(
                    InvalidInput(
                        f"no sentence longer than {options.min_length} and shorter than {options.max_length} "
                        "characters to summarize (options.min_length, options.max_length)",
                        field="text",
                    )
                )
        return rows

    def forward(self, loaded: Loaded, batch: Batch) -> list[Any]:
        output = loaded.model(**batch.model_inputs(), output_hidden_states=True)
        hidden = output.hidden_states[HIDDEN_LAYER].float()
        mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1)
        return list(mean.cpu().numpy())

    def postprocess(
        self, loaded: Loaded, item: TextItem, options: SummarizeOptions, rows: list[Row], outputs: list[Any]
    ) -> SummarizeResult:
        ordered = sorted(zip(rows, outputs), key=lambda pair: pair[0].meta.position)
        candidates: list[Candidate] = [row.meta for row, _ in ordered]
        features = np.stack([vector for _, vector in ordered]).astype(np.float32)
        sentences = [
            SummarySentence(index=c.index, text=item.text[c.start : c.end], start=c.start, end=c.end)
            for c in (candidates[i] for i in choose(features, options))
        ]
        return SummarizeResult(
            summary=" ".join(sentence.text for sentence in sentences),
            sentences=sentences,
            truncated=any(c.truncated for c in candidates),
        )


def candidate_spans(doc: Any, options: SummarizeOptions) -> list[tuple[int, int, int]]:
    """(sentence index, start, end) of each candidate: a stripped sentence of the right length."""
    found = []
    for index, sentence in enumerate(doc.sents):
        text = sentence.text
        stripped = text.strip()
        if options.min_length < len(stripped) < options.max_length:
            start = sentence.start_char + len(text) - len(text.lstrip())
            found.append((index, start, start + len(stripped)))
    return found


def choose(features: np.ndarray, options: SummarizeOptions) -> list[int]:
    """Positions of the chosen candidates, in text order."""
    if options.use_first and len(features) <= 1:
        return list(range(len(features)))
    first = 1 if options.use_first else 0
    rest = features[first:]
    if options.num_sentences is not None:
        clusters = min(options.num_sentences - first, len(rest))
    else:
        clusters = max(int(len(rest) * options.ratio), 1)
    return list(range(first)) + [first + i for i in nearest_to_centroids(rest, clusters)]


def nearest_to_centroids(features: np.ndarray, clusters: int) -> list[int]:
    """k-means, then per centroid in order the nearest row not taken by an earlier centroid; sorted.

    Distances within ``TIE`` (absolute and relative) of the nearest count as a tie, won by the earlier
    row. A cluster of two rows, or of repeats of one sentence, is such a tie by construction (its
    centroid is halfway, or on all of them): the reference picks by float rounding, which moves with
    the batch a row was computed in, and so would bertq's summary of one text from run to run."""
    if clusters == 0:
        return []
    if clusters >= len(features):  # every row is its own cluster: k-means would pick them all
        return list(range(len(features)))
    from sklearn.cluster import KMeans

    centroids = KMeans(n_clusters=clusters, random_state=RANDOM_STATE).fit(features).cluster_centers_
    taken: list[int] = []
    for centroid in centroids:
        distances = np.linalg.norm(features.astype(np.float64) - centroid, axis=1)
        distances[taken] = np.inf
        taken.append(int(np.flatnonzero(np.isclose(distances, distances.min(), rtol=TIE, atol=TIE))[0]))
    return sorted(taken)


TASK = SummarizeTask()
