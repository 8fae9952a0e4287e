"""The JSON Schema export: one document that producers in other languages validate against."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bertq.schemas import CONTRACTS, JobStatus, TaskName, json_schemas


@pytest.fixture(scope="module")
def schemas() -> dict[str, Any]:
    return json_schemas()


def test_every_task_has_kwargs_item_options_and_result(schemas: dict[str, Any]) -> None:
    assert set(schemas["tasks"]) == {task.value for task in TaskName}
    for task in TaskName:
        entry = schemas["tasks"][task.value]
        assert entry["celery_task"] == f"bertq.{task.value}"
        contract = CONTRACTS[task]
        for part in ("item", "options", "result"):
            assert entry[part]["type"] == "object"
            assert entry[part]["title"] == getattr(contract, part).__name__
        kwargs = entry["kwargs"]
        assert set(kwargs["properties"]) == {"items", "model", "options", "callback_url"} and kwargs["required"] == ["items"]
        assert kwargs["additionalProperties"] is False
        assert kwargs["properties"]["items"]["items"]["$ref"].endswith(contract.item.__name__)


def test_job_record_errors_and_status(schemas: dict[str, Any]) -> None:
    job = schemas["job"]
    assert set(job) == {"JobRecord", "ErrorRecord", "ItemError"}
    record = job["JobRecord"]
    assert set(record["required"]) == {"status", "result", "task_id", "bertq"}
    assert record["properties"]["status"]["enum"] == ["PENDING", "STARTED", "SUCCESS", "FAILURE", "REVOKED"]
    assert set(job["ErrorRecord"]["required"]) == {"code", "message"}
    assert schemas["job_status"] == [status.value for status in JobStatus]
    assert set(schemas["job_status"]) == {"queued", "running", "done", "failed", "cancelled", "expired", "unknown"}


def test_json_round_trip(schemas: dict[str, Any]) -> None:
    text = json.dumps(schemas)
    assert json.loads(text) == schemas
    assert schemas["$schema"].startswith("https://json-schema.org/")


def test_concrete_fields(schemas: dict[str, Any]) -> None:
    tasks = schemas["tasks"]
    qa_item = tasks["qa"]["item"]
    assert set(qa_item["required"]) == {"question", "context"}
    assert qa_item["additionalProperties"] is False
    assert set(tasks["nsp"]["item"]["required"]) == {"text", "text_pair"}
    for task in ("sentiment", "ner", "fill_mask", "embedding"):
        assert tasks[task]["item"]["required"] == ["text"]

    assert "targets" in tasks["fill_mask"]["options"]["properties"]
    assert tasks["fill_mask"]["options"]["properties"]["top_k"]["minimum"] == 1
    assert set(tasks["qa"]["options"]["properties"]) >= {
        "top_k", "doc_stride", "max_answer_len", "handle_impossible_answer",
    }
    assert tasks["ner"]["options"]["properties"]["aggregation_strategy"]["enum"] == [
        "none", "simple", "first", "average", "max",
    ]
    assert set(tasks["embedding"]["options"]["properties"]) >= {"pooling", "normalize"}

    assert set(tasks["sentiment"]["result"]["required"]) >= {"label", "score", "scores"}
    assert set(tasks["qa"]["result"]["required"]) >= {"answer", "score", "start", "end"}
    assert set(tasks["nsp"]["result"]["required"]) >= {"is_next", "score"}
    assert "embedding" in tasks["embedding"]["result"]["required"]
    entity = tasks["ner"]["result"]["$defs"]["NerEntity"]
    assert set(entity["required"]) >= {"entity_group", "score", "word", "start", "end"}
    prediction = tasks["fill_mask"]["result"]["$defs"]["MaskPrediction"]
    assert set(prediction["required"]) == {"token", "token_str", "score", "sequence"}


def test_exported_schemas_validate_samples(schemas: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    tasks = schemas["tasks"]

    def errors(schema: dict[str, Any], instance: Any) -> list[str]:
        validator = jsonschema.Draft202012Validator(schema)
        return [error.message for error in validator.iter_errors(instance)]

    for schema in [*schemas["job"].values(), *(part for t in tasks.values() for part in
                                                (t["kwargs"], t["item"], t["options"], t["result"]))]:
        jsonschema.Draft202012Validator.check_schema(schema)

    assert errors(tasks["qa"]["item"], {"question": "Where?", "context": "In Paris."}) == []
    assert errors(tasks["qa"]["item"], {"question": "Where?"})  # no context
    assert errors(tasks["qa"]["item"], {"question": "Where?", "context": "x", "lang": "en"})  # extra
    assert errors(tasks["fill_mask"]["options"], {"top_k": 3, "targets": ["paris"]}) == []
    assert errors(tasks["fill_mask"]["options"], {"top_k": 0})
    result = {"label": "POSITIVE", "score": 0.9, "scores": [{"label": "POSITIVE", "score": 0.9}]}
    assert errors(tasks["sentiment"]["result"], result) == []
    assert errors(tasks["sentiment"]["result"], {**result, "scores": [{"label": "POSITIVE"}]})
    kwargs = {"items": [{"question": "q", "context": "c"}], "model": None, "options": {"top_k": 2}}
    assert errors(tasks["qa"]["kwargs"], kwargs) == []
    assert errors(tasks["qa"]["kwargs"], {**kwargs, "extra": 1})
    assert errors(tasks["qa"]["kwargs"], {**kwargs, "items": []})
    assert errors(tasks["qa"]["kwargs"], {**kwargs, "items": [{"text": "not a qa item"}]})
