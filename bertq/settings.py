"""The one settings class. Every field is also an environment variable with the ``BERTQ_`` prefix.

Settings are read once, by whoever starts the process (the CLI, a worker, a test), and passed
down. Nothing reads the environment at import time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bertq.schemas import Limits, TaskName
from bertq.tenants import Quota, parse_quotas, parse_weights

#: What a real user gets when a task's model is not configured (needs the model hub once).
DEFAULT_MODELS: dict[TaskName, str] = {
    TaskName.sentiment: "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
    TaskName.ner: "dslim/bert-base-NER",
    TaskName.qa: "distilbert/distilbert-base-cased-distilled-squad",
    TaskName.fill_mask: "google-bert/bert-base-uncased",
    TaskName.nsp: "google-bert/bert-base-uncased",
    TaskName.embedding: "sentence-transformers/all-MiniLM-L6-v2",
    # the embedding default: a model trained so that the cosine of two embeddings measures similarity
    TaskName.similarity: "sentence-transformers/all-MiniLM-L6-v2",
    # what bert-extractive-summarizer's Summarizer() loads, so that its users get the same summaries
    TaskName.summarize: "google-bert/bert-large-uncased",
    # sentence-transformers' cross-encoder trained on MS MARCO passages: one label, the sigmoid of its logit
    TaskName.rerank: "cross-encoder/ms-marco-MiniLM-L6-v2",
}


#: ``max_batch_tokens`` when left at 0, by device.
CPU_BATCH_TOKENS = 1024
CUDA_BATCH_TOKENS = 16384


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BERTQ_", extra="ignore")

    redis_url: str | None = Field(
        None,
        repr=False,  # it may hold a password: repr(settings) and tracebacks must not show it
        description="Broker and result store, e.g. redis://host:6379/0, or a Sentinel URL "
        "sentinel://[:password@]host:26379[,host:26379...]/master-name[/db] (see Scaling out). Unset: `bertq demo` "
        "starts an embedded server; other commands refuse to guess.",
    )
    queue: str = Field("bertq", description="Celery queue that producers send to and workers consume.")
    routes: str = Field(
        "",
        description="Per-task queues, e.g. `embedding=gpu,ner=gpu`: producers send those tasks there and "
        "`bertq worker --tasks` consumes them. Unlisted tasks use BERTQ_QUEUE.",
    )
    streams: str = Field(
        "",
        description="Redis Streams to enrich: a JSON list of sources, or `;`-separated `INPUT=TASK[,TASK...]` "
        "(see README, Review streams). Workers read them beside the queue.",
    )
    tenant_weights: str = Field(
        "",
        description='Tenants\' shares of the workers, a JSON object such as `{"shop-a": 2, "shop-b": 1}`: a '
        "worker serves each queue's tenants in weighted fair turns by items. Unlisted tenants weigh 1 (see Tenants).",
    )
    tenant_quotas: str = Field(
        "",
        description='Per-tenant limits checked at submit, a JSON object such as `{"shop-a": {"max_queued_items": '
        '100000, "max_items_per_minute": 50000}}`; a submit over one raises QuotaExceeded and queues nothing.',
    )
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
    model_similarity: str = Field(DEFAULT_MODELS[TaskName.similarity], description="Hub id or local path.")
    model_summarize: str = Field(DEFAULT_MODELS[TaskName.summarize], description="Hub id or local path.")
    model_rerank: str = Field(
        DEFAULT_MODELS[TaskName.rerank], description="Hub id or local path: a one-label sequence classifier."
    )

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
    int8_recipe: str = Field(
        "auto",
        description="What `openvino-int8` quantises: `auto` (by the CPU's features: `attention-float` on AMX, "
        "`attention-int8` then `attention-float` on AVX512-VNNI or AVX-VNNI without AMX, the first that passes the "
        "accuracy gate), or recipe names to try in order, comma-separated (`attention-float`, `attention-int8`).",
    )
    held_out_file: str | None = Field(
        None,
        description="Your own held-out text for the accuracy gate (text lines, or JSONL with a `text` field): one "
        "more domain, named after the file, judged beside the shipped ones.",
    )
    accept_any_accuracy: bool = Field(
        False,
        description="Serve a model on a path that failed its accuracy gate (embedding minimum cosine under "
        "0.99 or a top-1 agreement under 0.98 against fp32, on any held-out domain).",
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
    max_candidates: int = Field(
        1024, ge=1, description="Most candidates in one similarity item, or documents in one rerank item."
    )
    max_chunks: int = Field(64, ge=1, description="Most windows of one text with `long_text: chunk`.")
    result_cache_ttl_s: int = Field(
        0,
        ge=0,
        description="Seconds an item's result is kept for other jobs with the same task, model, options and item "
        "(0: no result cache).",
    )
    result_cache_max_bytes: int = Field(
        65_536, ge=1, description="Largest item result the result cache keeps, in JSON bytes."
    )
    job_time_limit_s: float = Field(
        0,
        ge=0,
        description="Seconds a job may run on a worker, from its claim (0: no limit; a message's own "
        "`timelimit` header may set a shorter one). Past it, its rows still waiting are dropped and it fails "
        "with code `time_limit_exceeded`.",
    )
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest accepted job message.")
    items_per_message: int = Field(64, ge=1, description="Items per message in `submit_many`.")
    max_result_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest job record a worker stores; a job whose results are bigger fails with code "
        "`result_too_large`. Keep it under Redis's `client-output-buffer-limit pubsub` hard limit (32 MB by "
        "default): records are published to Celery's `AsyncResult` subscribers, and the worker warns at start "
        "when they may not fit.",
    )

    visibility_timeout_s: int = Field(
        30,
        ge=2,
        description="Seconds a worker may go without a heartbeat before the jobs it holds are given to "
        "others. A live worker's jobs are never redelivered, however long they take.",
    )
    sweep_interval_s: int = Field(
        5, ge=1, description="Seconds between a worker's looks for silent workers whose jobs to reclaim."
    )
    max_deliveries: int = Field(
        3,
        ge=1,
        description="Deliveries of a job that end with its worker gone before the job is dead-lettered "
        "(failed with code `dead_lettered`; see `bertq dead`).",
    )
    prefetch: int = Field(
        256, ge=1, description="Job messages a worker holds at once; more lets it batch across more jobs."
    )
    max_held_items: int = Field(2048, ge=1, description="Items a worker holds before it stops fetching messages.")
    shutdown_timeout_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, seconds a worker takes to finish the jobs already in a batch before it "
        "gives everything still held back to the queue and exits; `bertq serve`: seconds its requests in "
        "flight get to finish.",
    )
    stall_timeout_s: float = Field(
        120.0,
        ge=1,
        description="A worker holding jobs without progress this long exits non-zero (and `bertq worker "
        "--check` fails), as it does when Redis stays unreachable this long.",
    )
    model_load_timeout_s: float = Field(
        600.0,
        ge=1,
        description="A model load (download, conversion, reading its files) that takes longer than this ends the "
        "worker non-zero, as a stall does: a hung mount must not pin the jobs it holds.",
    )
    dead_letter_ttl_s: int = Field(
        7 * 86_400,
        ge=60,
        description="Seconds a dead letter (`bertq:dead`, `<input>:dead`) is kept; older entries are trimmed.",
    )
    dead_letter_max_bytes: int = Field(
        1024 * 1024,
        ge=256,
        description="Most bytes of a message kept in its dead letter; a longer one keeps its first bytes, marked "
        "`truncated`.",
    )
    allowed_models: str = Field(
        "",
        description="Comma-separated hub ids or paths a job may name besides the configured task models "
        "(BERTQ_MODEL_<TASK>). `*` allows any: only for trusted producers.",
    )
    max_loaded_models: int = Field(8, ge=1, description="Models a worker keeps loaded; the least recently used goes.")

    webhook_secret: str | None = Field(
        None,
        repr=False,  # repr(settings) and tracebacks must not show it
        description="Key of the HMAC-SHA256 signature (header X-Bertq-Signature) of `<X-Bertq-Timestamp>.<body>` "
        "of every webhook call.",
    )
    webhook_allowed_hosts: str = Field(
        "",
        description="Comma-separated hosts a job's `callback_url` may call: `host` on its scheme's default port "
        "(80, 443) only, `host:port` on that port, https only unless the entry starts with `http://` "
        "(`http://host:port`); empty: none. Others are refused, and the refusal recorded.",
    )
    webhook_allow_private: bool = Field(
        False,
        description="Whether a listed host name may resolve to a loopback, private, link-local or other "
        "non-public address (a listed IP address is always called as listed). Off, such a call fails.",
    )
    webhook_timeout_s: float = Field(
        5.0, gt=0, description="Seconds each step of a webhook call (connect, TLS, send, answer) may take."
    )
    webhook_max_attempts: int = Field(
        5, ge=1, description="Calls of a webhook before it is given up (backoff 1 s, 2 s, 4 s...)."
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve Prometheus metrics on this port (unset: off). With `--gpus`, the worker of GPU i "
        "serves on this port + i.",
    )

    http_host: str = Field(
        "127.0.0.1", description="Address `bertq serve` listens on (`0.0.0.0`: every interface, as in a container)."
    )
    http_port: int = Field(8000, ge=1, le=65535, description="Port `bertq serve` listens on.")
    api_keys: str = Field(
        "",
        repr=False,  # repr(settings) and tracebacks must not show them
        description="Comma-separated keys the HTTP gateway accepts as `Authorization: Bearer <key>` on `/v1/`; "
        "empty: no authentication (the gateway logs a warning at start).",
    )
    http_max_body_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Largest request body the gateway reads; a bigger one is answered 413 before anything is queued.",
    )
    http_timeout_s: float = Field(
        30.0,
        gt=0,
        description="How long `POST /v1/embeddings` and `POST /v1/rerank` wait for their job; then they answer 504 "
        "with the job id to poll.",
    )
    http_max_wait_s: float = Field(60.0, gt=0, description="Longest `?wait=` of `GET /v1/jobs/{id}`, in seconds.")

    remote_control: Literal["all", "inspect", "off"] = Field(
        "all",
        description="Which Celery remote-control commands a worker answers: `all`; `inspect` (ping, stats, "
        "active... but no `revoke`, `shutdown` or other control command); `off` (no pidbox at all). Anyone who "
        "may PUBLISH on the Redis may send them.",
    )
    log_format: Literal["console", "json"] = Field("console", description="Log line format.")
    log_level: str = Field("INFO", description="Log level of bertq's loggers.")

    @model_validator(mode="after")
    def _batch_tokens_for_device(self) -> Settings:
        if self.max_batch_tokens == 0:
            self.max_batch_tokens = CUDA_BATCH_TOKENS if self.device.startswith("cuda") else CPU_BATCH_TOKENS
        return self

    @model_validator(mode="after")
    def _tenants_readable(self) -> Settings:
        self.weights()
        self.quotas()
        return self

    def weights(self) -> dict[str, float]:
        """``tenant_weights`` by tenant (unlisted tenants weigh 1)."""
        return parse_weights(self.tenant_weights)

    def quotas(self) -> dict[str, Quota]:
        return parse_quotas(self.tenant_quotas)

    def configured_tenants(self) -> frozenset[str]:
        """The tenants named in ``tenant_weights`` or ``tenant_quotas``: workers serve them even before
        any submit indexes them, and metrics label them by name."""
        return frozenset(self.weights()) | frozenset(self.quotas())

    def model_for(self, task: TaskName) -> str:
        return str(getattr(self, f"model_{task.value}"))

    def stream_specs(self) -> list[str]:
        """``streams`` as one spec per source (see bertq/streams.py: parse_sources)."""
        text = self.streams.strip()
        if text.startswith("["):
            import json

            return [json.dumps(source) for source in json.loads(text)]
        return [spec for spec in (part.strip() for part in text.split(";")) if spec]

    def queue_for(self, task: TaskName) -> str:
        """The queue jobs of ``task`` are sent to."""
        return self.route_map().get(task, self.queue)

    def route_map(self) -> dict[TaskName, str]:
        routes: dict[TaskName, str] = {}
        for entry in filter(None, (part.strip() for part in self.routes.split(","))):
            task, sep, queue = entry.partition("=")
            if not sep or not queue.strip():
                raise ValueError(f"BERTQ_ROUTES: {entry!r} is not task=queue")
            try:
                routes[TaskName(task.strip())] = queue.strip()
            except ValueError:
                raise ValueError(f"BERTQ_ROUTES: unknown task {task.strip()!r}") from None
        return routes

    def queues_for(self, tasks: list[TaskName]) -> list[str]:
        """The queues a worker serving only ``tasks`` consumes. Refuses a queue that also carries a
        task outside ``tasks``: such a worker would take jobs it must not run."""
        queues = list(dict.fromkeys(self.queue_for(task) for task in tasks))
        for other in TaskName:
            if other not in tasks and self.queue_for(other) in queues:
                raise ValueError(
                    f"queue {self.queue_for(other)!r} also carries {other.value} jobs: route it elsewhere with "
                    f"BERTQ_ROUTES or add it to --tasks"
                )
        return queues

    def model_allowed(self, task: TaskName, model_id: str) -> bool:
        """Whether a job of ``task`` may name ``model_id``: the task's own configured model, or one listed in
        BERTQ_ALLOWED_MODELS. Another task's model is not implied: it would load with a head it lacks."""
        listed = {model.strip() for model in self.allowed_models.split(",") if model.strip()}
        return "*" in listed or model_id in listed or model_id == self.model_for(task)

    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]

    def limits(self) -> Limits:
        return Limits(
            max_text_chars=self.max_text_chars,
            max_items_per_job=self.max_items_per_job,
            max_candidates=self.max_candidates,
        )
