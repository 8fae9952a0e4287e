"""The foundation: light imports, settings, errors, logging, the embedded Redis, and the tiny checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from bertq.schemas import Limits, TaskName

from bertq.errors import BertqError, DeadLettered, InferenceFailed, InvalidInput, ModelUnavailable
from bertq.settings import DEFAULT_MODELS, Settings


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter, so that sys.modules and logging start clean."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )


# ---- light imports ---------------------------------------------------------------------------------

#: The worker extras: a producer's `pip install bertq` has none of them (tests/test_producer_install.py).
HEAVY = ("torch", "transformers", "numpy", "prometheus_client")


@pytest.mark.parametrize(
    "modules",
    [
        ("bertq.schemas", "bertq.settings", "bertq.errors", "bertq.log"),
        # Written in parallel with these tests: they fail (ModuleNotFoundError) until they exist.
        ("bertq.client",),
        ("bertq.workers.app",),
        ("bertq.enrich", "bertq.files"),  # `bertq enrich` through the queue is a producer
        ("bertq.status", "bertq.workers.queues.dead"),  # `bertq status`, `bertq dead`
        ("bertq.cli",),
    ],
    ids=["foundation", "client", "celery-app", "enrich", "status", "cli"],
)
def test_producer_side_imports_stay_light(modules: tuple[str, ...]) -> None:
    # An invalid BERTQ_ value also proves that importing reads no settings: only constructing does.
    done = run_python(
        f"""
        import sys
        for name in {modules!r}:
            __import__(name)
        print(",".join(sorted(m for m in {HEAVY!r} if m in sys.modules)))
        """,
        BERTQ_MAX_TEXT_CHARS="not-a-number",
        BERTQ_LOG_FORMAT="not-a-format",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"importing {modules} loaded {done.stdout.strip()}"


# ---- settings ----------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("BERTQ_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_settings_read_env_at_construction_not_import(clean_env: pytest.MonkeyPatch) -> None:
    before = Settings()
    assert before.max_text_chars == 50_000
    clean_env.setenv("BERTQ_MAX_TEXT_CHARS", "123")
    clean_env.setenv("BERTQ_REDIS_URL", "redis://example:6380/2")
    clean_env.setenv("BERTQ_LOG_FORMAT", "json")
    after = Settings()
    assert after.max_text_chars == 123
    assert after.redis_url == "redis://example:6380/2"
    assert after.log_format == "json"
    assert before.max_text_chars == 50_000  # read once: an existing instance does not follow the env


def test_settings_defaults(clean_env: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert settings.redis_url is None
    assert settings.device == "cpu"
    assert settings.max_items_per_job == 4096


def test_batch_token_budget_follows_the_device_unless_set(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings().max_batch_tokens == 1024
    assert Settings(device="cuda:1").max_batch_tokens == 16384
    clean_env.setenv("BERTQ_MAX_BATCH_TOKENS", "3000")
    assert Settings(device="cuda").max_batch_tokens == 3000


def test_settings_refuse_invalid_env(clean_env: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    clean_env.setenv("BERTQ_MAX_BATCH_ROWS", "0")
    with pytest.raises(ValidationError, match="max_batch_rows"):
        Settings()


def test_model_for_each_task(clean_env: pytest.MonkeyPatch) -> None:
    assert {task: Settings().model_for(task) for task in TaskName} == DEFAULT_MODELS
    assert Settings().model_for(TaskName.embedding) == "sentence-transformers/all-MiniLM-L6-v2"
    clean_env.setenv("BERTQ_MODEL_QA", "/models/my-qa")
    clean_env.setenv("BERTQ_MODEL_FILL_MASK", "/models/my-mlm")
    settings = Settings()
    assert settings.model_for(TaskName.qa) == "/models/my-qa"
    assert settings.model_for(TaskName.fill_mask) == "/models/my-mlm"
    assert settings.model_for(TaskName.nsp) == DEFAULT_MODELS[TaskName.nsp]


def test_limits_follow_settings(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings().limits() == Limits()
    clean_env.setenv("BERTQ_MAX_TEXT_CHARS", "77")
    clean_env.setenv("BERTQ_MAX_ITEMS_PER_JOB", "5")
    clean_env.setenv("BERTQ_MAX_CANDIDATES", "9")
    assert Settings().limits() == Limits(max_text_chars=77, max_items_per_job=5, max_candidates=9)


def test_every_settings_field_is_documented() -> None:
    undocumented = [name for name, field in Settings.model_fields.items() if not field.description]
    assert undocumented == []


# ---- errors ----------------------------------------------------------------------------------------


def test_error_record_has_code_field_and_message() -> None:
    error = InvalidInput("empty text", field="items[2].text")
    record = error.to_record()
    assert set(record) == {"code", "field", "message"}
    assert record["code"] == "invalid_input"
    assert record["field"] == "items[2].text"
    assert "empty text" in record["message"]
    json.dumps(record)  # stored as JSON


def test_str_includes_the_field() -> None:
    assert str(InvalidInput("empty text", field="items[2].text")) == "items[2].text: empty text"
    assert str(DeadLettered("delivered 3 times")) == "delivered 3 times"
    assert InvalidInput("x", field="items[0].text").message == "x"


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (InvalidInput, "invalid_input"),
        (ModelUnavailable, "model_unavailable"),
        (DeadLettered, "dead_lettered"),
        (InferenceFailed, "inference_failed"),
    ],
)
def test_each_error_has_its_code(cls: type[BertqError], code: str) -> None:
    assert issubclass(cls, BertqError)
    assert not issubclass(cls, ValueError)  # never re-wrapped as ValueError
    assert cls.code == code
    assert cls("boom").to_record() == {"code": code, "field": None, "message": "boom"}


def test_error_rebuilds_from_its_args_like_celery_does() -> None:
    error = InvalidInput("empty text", field="items[2].text")
    rebuilt = type(error)(*error.args)
    assert type(rebuilt) is InvalidInput
    assert rebuilt.message == "empty text"
    assert "empty text" in str(rebuilt)


def test_rebuilt_error_keeps_its_field() -> None:
    error = InvalidInput("empty text", field="items[2].text")
    rebuilt = type(error)(*error.args)
    assert rebuilt.field == "items[2].text"
    assert str(rebuilt) == "items[2].text: empty text"


# ---- logging ------------------------------------------------------------------------------------------


def test_json_logging_writes_one_object_per_line_and_leaves_root_alone() -> None:
    done = run_python(
        """
        import json, logging, sys
        root = logging.getLogger()
        marker = logging.StreamHandler(sys.stdout)
        root.addHandler(marker)
        root.setLevel(logging.WARNING)
        handlers = list(root.handlers)

        from bertq.log import configure_logging, get_logger
        log = get_logger("bertq.test")
        configure_logging("json", "DEBUG")
        log.info("job_done", job_id="j1", elapsed_ms=12.5)
        log.debug("detail", n=1)
        configure_logging("json", "WARNING")
        log.info("filtered_out")
        log.warning("slow", ms=900)

        assert root.handlers == handlers, root.handlers
        assert root.level == logging.WARNING, root.level
        assert logging.getLogger("bertq").handlers == []
        print("root unchanged")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "root unchanged"  # and nothing of bertq's went through the root logger
    lines = done.stderr.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["event"] for r in records] == ["job_done", "detail", "slow"]
    assert [r["level"] for r in records] == ["info", "debug", "warning"]
    assert {r["logger"] for r in records} == {"bertq.test"}
    assert records[0]["job_id"] == "j1" and records[0]["elapsed_ms"] == 12.5
    assert all("timestamp" in r for r in records)


def test_console_logging_is_not_json() -> None:
    done = run_python(
        """
        from bertq.log import configure_logging, get_logger
        configure_logging("console")
        get_logger("bertq.test").info("started", queue="bertq")
        """
    )
    assert done.returncode == 0, done.stderr
    line = done.stderr.strip()
    assert "started" in line and "queue=bertq" in line and "bertq.test" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


# ---- embedded redis ----------------------------------------------------------------------------------


def test_embedded_redis_serves_and_stops() -> None:
    import redis

    from bertq.embedded import redis_url_or_embedded

    with redis_url_or_embedded(None) as url:
        assert url.startswith("redis://")
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        assert client.ping() is True
        client.set("bertq:test", "value")
        assert client.get("bertq:test") == b"value"
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.close()
    gone = redis.Redis.from_url(url, socket_connect_timeout=1)
    with pytest.raises(redis.ConnectionError):
        gone.ping()


def test_given_url_is_yielded_untouched() -> None:
    from bertq.embedded import redis_url_or_embedded

    url = "redis://nowhere.invalid:6390/3"
    with redis_url_or_embedded(url) as got:
        assert got == url


# ---- tiny checkpoints ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline() -> Any:
    from transformers import pipeline

    return pipeline


def test_sentiment_checkpoint(tiny_models: dict[str, Path], pipeline: Any) -> None:
    classify = pipeline("text-classification", model=str(tiny_models["sentiment"]))
    assert classify.model.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    out = classify(["I loved it", "Awful."], top_k=None)
    assert len(out) == 2
    for scores in out:
        assert {s["label"] for s in scores} == {"NEGATIVE", "POSITIVE"}
        assert sum(s["score"] for s in scores) == pytest.approx(1.0, abs=1e-5)  # softmax


def test_multilabel_checkpoint(tiny_models: dict[str, Path], pipeline: Any) -> None:
    from bertq.tiny_models import EMOTION_LABELS

    config = json.loads((tiny_models["multilabel"] / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    classify = pipeline("text-classification", model=str(tiny_models["multilabel"]))
    scores = classify("What a day!", top_k=None)
    assert {s["label"] for s in scores} == set(EMOTION_LABELS)
    assert all(0.0 < s["score"] < 1.0 for s in scores)
    assert sum(s["score"] for s in scores) != pytest.approx(1.0, abs=1e-3)  # independent sigmoids


def test_ner_checkpoint(tiny_models: dict[str, Path], pipeline: Any) -> None:
    tag = pipeline("ner", model=str(tiny_models["ner"]))
    labels = list(tag.model.config.id2label.values())
    assert labels[0] == "O"
    assert all(label == "O" or label[:2] in ("B-", "I-") for label in labels)
    assert {label[2:] for label in labels if label != "O"} == {"PER", "ORG", "LOC", "MISC"}
    text = "John lives in Paris"
    tokens = tag(text)
    assert tokens, "random heads tag something"
    for token in tokens:
        assert token["entity"] in labels and token["entity"] != "O"
        assert text[token["start"] : token["end"]].lower() == token["word"]


def test_fill_mask_checkpoint(tiny_models: dict[str, Path], pipeline: Any) -> None:
    fill = pipeline("fill-mask", model=str(tiny_models["fill_mask"]))
    predictions = fill("Paris is the [MASK] of France.", top_k=3)
    assert len(predictions) == 3
    for p in predictions:
        assert set(p) == {"score", "token", "token_str", "sequence"}
        assert "[MASK]" not in p["sequence"]
    assert predictions[0]["score"] >= predictions[1]["score"] >= predictions[2]["score"]


def test_base_checkpoint_feature_extraction(tiny_models: dict[str, Path], pipeline: Any) -> None:
    extract = pipeline("feature-extraction", model=str(tiny_models["base"]))
    features = extract("hello world", return_tensors=True)
    assert tuple(features.shape) == (1, 4, 32)  # [CLS] hello world [SEP], hidden size 32


def test_qa_checkpoint_logits(tiny_models: dict[str, Path]) -> None:
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qa"])
    model = AutoModelForQuestionAnswering.from_pretrained(tiny_models["qa"]).eval()
    encoded = tokenizer(
        ["Where is it?", "Who?"], ["It is in Paris.", "Marie Curie did."], padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        out = model(**encoded)
    assert out.start_logits.shape == encoded["input_ids"].shape
    assert out.end_logits.shape == encoded["input_ids"].shape


def test_nsp_checkpoint_logits(tiny_models: dict[str, Path]) -> None:
    import torch
    from transformers import AutoTokenizer, BertForNextSentencePrediction

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["nsp"])
    model = BertForNextSentencePrediction.from_pretrained(tiny_models["nsp"]).eval()
    with torch.inference_mode():
        logits = model(**tokenizer("One.", "Two.", return_tensors="pt")).logits
    assert tuple(logits.shape) == (1, 2)


def test_real_minilm_loads_offline(minilm: Path, pipeline: Any) -> None:
    extract = pipeline("feature-extraction", model=str(minilm))
    assert extract.model.config.hidden_size == 384
    assert extract.model.config.num_hidden_layers == 6
    features = extract("hello world", return_tensors=True)
    assert tuple(features.shape) == (1, 4, 384)
