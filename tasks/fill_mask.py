"""Fill-mask: the top_k tokens for each mask token of a text, optionally among given targets only.
Scores, tokens and sequences match transformers' fill-mask pipeline, several masks included: each
mask's probabilities are its own (not joint), and each sequence fills that one mask."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bertq.schemas import FillMaskOptions, FillMaskResult, MaskPrediction, TaskName, TextItem
from bertq.tasks.base import Batch, Loaded, Row, cap_chars, chars_for_tokens

from bertq.errors import BertqError, InvalidInput, ModelUnavailable


@dataclass
class MaskedRow:
    positions: list[int]  # of the mask tokens in the row
    top_k: int
    target_ids: list[int] | None
    truncated: bool


def resolve_targets(loaded: Loaded, targets: list[str]) -> list[int]:
    """Candidate token ids, picked as the pipeline picks them: a target that is not a vocab token
    stands for the first token it tokenizes to; one that tokenizes to nothing is dropped."""
    ids: set[int] = set()
    for target in targets:
        if target in loaded.extra["vocab"]:
            ids.add(loaded.extra["vocab"][target])
            continue
        tokens = loaded.tokenizer(target, add_special_tokens=False, truncation=True, max_length=1)["input_ids"]
        ids.update(tokens[:1])
    return sorted(ids)


def filled_sequence(loaded: Loaded, input_ids: list[int], position: int, token: int, single_mask: bool) -> str:
    """The text with one mask filled in, decoded as the pipeline does: pad ids are dropped (a predicted
    pad too), and with several masks special tokens are kept, so the other masks stay visible."""
    filled = list(input_ids)
    filled[position] = token
    pad_id = loaded.tokenizer.pad_token_id
    return str(loaded.tokenizer.decode([t for t in filled if t != pad_id], skip_special_tokens=single_mask))


#: The attribute of a masked-LM model that maps hidden states to vocabulary logits, where it is one
#: module: BERT and DeBERTa ``cls``, RoBERTa and XLM-R ``lm_head``, ALBERT ``predictions``.
HEAD_NAMES = ("cls", "lm_head", "predictions")


def encoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """The model's encoder and its prediction head, so that the head runs on the mask positions only
    (for BERT-base it is a fifth of the forward's work at every token); None where the head is not one
    known module (DistilBERT, ELECTRA, an OpenVINO graph), which then computes every token's logits."""
    prefix = getattr(model, "base_model_prefix", "")
    encoder = getattr(model, prefix, None) if prefix else None
    head = next((getattr(model, name) for name in HEAD_NAMES if callable(getattr(model, name, None))), None)
    return None if encoder is None or head is None else (encoder, head)


class FillMaskTask:
    name = TaskName.fill_mask
    model_class = "AutoModelForMaskedLM"

    def on_load(self, loaded: Loaded, local_dir: Path | None) -> None:
        if loaded.tokenizer.mask_token_id is None:
            raise ModelUnavailable(f"the tokenizer of {loaded.model_id!r} defines no mask token", field="model")
        loaded.extra["vocab"] = loaded.tokenizer.get_vocab()
        loaded.extra["encoder_and_head"] = encoder_and_head(loaded.model)

    def preprocess(
        self, loaded: Loaded, items: list[TextItem], options: FillMaskOptions
    ) -> list[list[Row] | BertqError]:
        candidates = None if options.targets is None else resolve_targets(loaded, options.targets)
        if candidates == []:
            return [
                InvalidInput(f"no target of {options.targets} is a token of the model", field="options.targets")
                for _ in items
            ]
        texts, cut = zip(*(cap_chars(item.text, chars_for_tokens(loaded.max_length)) for item in items))
        encoded = loaded.tokenizer(list(texts), truncation=True, max_length=loaded.max_length)
        mask_id, mask = loaded.tokenizer.mask_token_id, loaded.tokenizer.mask_token
        rows: list[list[Row] | BertqError] = []
        for i, encoding in enumerate(encoded.encodings):
            truncated = cut[i] or bool(encoding.overflowing)
            positions = [position for position, token in enumerate(encoding.ids) if token == mask_id]
            if not positions:
                where = f"the first {loaded.max_length} tokens of the text" if truncated else "the text"
                rows.append(InvalidInput(f"no {mask} token in {where}", field="text"))
                continue
            meta = MaskedRow(positions=positions, top_k=options.top_k, target_ids=candidates, truncated=truncated)
            rows.append([Row(i, list(encoding.ids), list(encoding.type_ids), meta)])
        return rows

    def forward(self, loaded: Loaded, batch: Batch) -> list[Any]:
        import torch

        inputs = batch.model_inputs()
        device = inputs["input_ids"].device
        row_of_mask = torch.tensor([i for i, row in enumerate(batch.rows) for _ in row.meta.positions], device=device)
        position_of_mask = torch.tensor([p for row in batch.rows for p in row.meta.positions], device=device)
        # [masks, vocab]: only the mask positions' logits, on the device
        split = loaded.extra.get("encoder_and_head")
        if split is None:
            logits = loaded.model(**inputs).logits[row_of_mask, position_of_mask]
        else:
            encoder, head = split
            logits = head(encoder(**inputs).last_hidden_state[row_of_mask, position_of_mask])
        probabilities = logits.float().softmax(-1)
        results = []
        first = 0
        for row in batch.rows:
            meta: MaskedRow = row.meta
            row_probabilities = probabilities[first : first + len(meta.positions)]
            first += len(meta.positions)
            if meta.target_ids is None:
                scores, ids = row_probabilities.topk(min(meta.top_k, row_probabilities.shape[-1]))
            else:
                targets = torch.tensor(meta.target_ids, device=device)
                scores, indices = row_probabilities[:, targets].topk(min(meta.top_k, len(meta.target_ids)))
                ids = targets[indices]
            results.append((scores.cpu().tolist(), ids.cpu().tolist()))
        return results

    def postprocess(
        self, loaded: Loaded, item: TextItem, options: FillMaskOptions, rows: list[Row], outputs: list[Any]
    ) -> FillMaskResult:
        (row,), ((scores, ids),) = rows, outputs
        meta: MaskedRow = row.meta
        masks = [
            [
                MaskPrediction(
                    token=token,
                    token_str=loaded.tokenizer.decode([token]),
                    score=score,
                    sequence=filled_sequence(loaded, row.input_ids, position, token, len(meta.positions) == 1),
                )
                for score, token in zip(mask_scores, mask_ids)
            ]
            for position, mask_scores, mask_ids in zip(meta.positions, scores, ids)
        ]
        return FillMaskResult(masks=masks, truncated=meta.truncated)


TASK = FillMaskTask()
