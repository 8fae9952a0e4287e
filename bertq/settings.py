"""The one settings class. Every field is also an environment variable with the ``BERTQ_`` prefix.

Settings are read once, by whoever starts the process (the CLI, a worker, a test), and passed
down. Nothing reads the environment at import time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bertq.schemas import Limits, TaskName

#: What a real user gets when a task's model is not configured (needs the model hub once).
DEFAULT_MODELS: dict[TaskName, str] = {
    TaskName.sentiment: "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
    TaskName.ner: "dslim/bert-base-NER",
    TaskName.qa: "distilbert/distilbert-base-cased-distilled-squad",
    TaskName.fill_mask: "google-bert/bert-base-uncased",
    TaskName.nsp: "google-bert/bert-base-uncased",
    TaskName.embedding: "sentence-transformers/all-MiniLM-L6-v2",
}


#: ``max_batch_tokens`` when left at 0, by device.
CPU_BATCH_TOKENS = 1024
CUDA_BATCH_TOKENS = 16384


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BERTQ_", extra="ignore")

    redis_url: str | None = Field(
        None,
        description="Broker and result store, e.g. redis://host:6379/0. Unset: `bertq demo` starts an "
        "embedded server; other commands refuse to guess.",
    )
    queue: str = Field("bertq", description="Celery queue that producers send to and workers consume.")
    result_ttl_s: int = Field(86_400, ge=1, description="Seconds a job record and its result are kept.")
    results_stream_maxlen: int = Field(
        100_000, ge=1, description="Approximate length cap of the `bertq:results` completion stream."
    )

    model_sentiment: str = Field(DEFAULT_MODELS[TaskName.sentiment], description="Hub id or local path.")
    model_ner: str = Field(DEFAULT_MODELS[TaskName.ner], description="Hub id or local path.")
    model_qa: str = Field(DEFAULT_MODELS[TaskName.qa], description="Hub id or local path.")
    model_fill_mask: str = Field(DEFAULT_MODELS[TaskName.fill_mask], description="Hub id or local path.")
    model_nsp: str = Field(DEFAULT_MODELS[TaskName.nsp], description="Hub id or local path.")
    model_embedding: str = Field(DEFAULT_MODELS[TaskName.embedding], description="Hub id or local path.")

    device: str = Field("cpu", description="`cpu`, `cuda` or `cuda:N`.")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description="Precision. `auto`: fp16 on CUDA; on CPU fp32 with `torch`, OpenVINO's own choice with "
        "the openvino backends (bf16 where the CPU has it natively). `bf16` on CPU needs AVX512-BF16 or AMX "
        "(refused elsewhere: emulated bf16 is slower); `fp16` is CUDA only; `fp32` forces fp32.",
    )
    backend: Literal["torch", "openvino", "openvino-int8"] = Field(
        "torch",
        description="What runs the forward pass: `torch`; `openvino` (CPU, converted once and cached); "
        "`openvino-int8` (CPU, static int8 quantised with calibration text, cached, accuracy-gated). "
        "The openvino ones need `pip install 'bertq[openvino]'`.",
    )
    cpu_threads: int = Field(
        0, ge=0, description="Threads of the forward pass on CPU (torch and OpenVINO). 0: torch's default, all cores."
    )
    cache_dir: str | None = Field(
        None,
        description="Where converted and quantised models and their accuracy reports are kept. "
        "Unset: `$HF_HOME/bertq` (`~/.cache/huggingface/bertq`).",
    )
    calibration_file: str | None = Field(
        None,
        description="Calibration text for `openvino-int8` (text lines, or JSONL with a `text` field). "
        "Unset: a general-English set that ships with bertq.",
    )
    accept_any_accuracy: bool = Field(
        False,
        description="Serve a model on a path that failed its accuracy gate (embedding minimum cosine under "
        "0.99 or a top-1 agreement under 0.98 against fp32).",
    )

    max_batch_tokens: int = Field(
        0,
        ge=0,
        description="Padded tokens per forward batch (rows x longest row, padded to 8). 0: 1024 on CPU, where "
        "a bigger batch is no faster and every row waits for the whole batch (BENCHMARKS.md, batch settings); "
        "16384 on CUDA.",
    )
    max_batch_rows: int = Field(64, ge=1, description="Rows per forward batch.")
    max_wait_ms: float = Field(
        5.0, ge=0, description="How long a worker waits for more work to fill a batch when the device is idle."
    )

    max_text_chars: int = Field(50_000, ge=1, description="Longest accepted text, in characters.")
    max_items_per_job: int = Field(4096, ge=1, description="Most items in one job.")
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest accepted job message.")
    items_per_message: int = Field(64, ge=1, description="Items per message in `submit_many`.")

    visibility_timeout_s: int = Field(
        90, ge=1, description="Seconds before an unacknowledged job is redelivered to another worker."
    )
    sweep_interval_s: int = Field(
        10, ge=1, description="Seconds between a worker's scans for unacknowledged jobs to redeliver."
    )
    prefetch: int = Field(
        256, ge=1, description="Job messages a worker holds at once; more lets it batch across more jobs."
    )

    max_held_items: int = Field(
        2048,
        ge=1,
        description="Items a worker holds before it stops fetching messages. Keep the time to finish "
        "them well under the visibility timeout.",
    )

    log_format: Literal["console", "json"] = Field("console", description="Log line format.")
    log_level: str = Field("INFO", description="Log level of bertq's loggers.")

    @model_validator(mode="after")
    def _batch_tokens_for_device(self) -> Settings:
        if self.max_batch_tokens == 0:
            self.max_batch_tokens = CUDA_BATCH_TOKENS if self.device.startswith("cuda") else CPU_BATCH_TOKENS
        return self

    def model_for(self, task: TaskName) -> str:
        return str(getattr(self, f"model_{task.value}"))

    def limits(self) -> Limits:
        return Limits(max_text_chars=self.max_text_chars, max_items_per_job=self.max_items_per_job)
