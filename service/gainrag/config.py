"""Service settings: one pydantic-settings object, env prefix ``GAINRAG_``, nested with ``__``.

Example: ``GAINRAG_RETRIEVAL__K=20 GAINRAG_LLM__MODEL=qwen2.5-coder-0.5b gainrag serve``.
Every field is documented in the README (``gainrag settings`` prints the effective values).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


class RetrievalSettings(BaseModel):
    """Dense retrieval: encoder, FAISS index and how many passages to fetch."""

    encoder: str = Field(
        "all-MiniLM-L6-v2",
        description="Bi-encoder: bundled 'all-MiniLM-L6-v2' or a local directory.",
    )
    index_dir: Path = Field(Path("var/index"), description="Directory of the built FAISS index.")
    corpus: Path = Field(Path("data/corpus.jsonl"), description="Corpus JSONL used by `prepare`.")
    k: int = Field(100, ge=1, le=1000, description="Passages retrieved per question.")
    max_length: int = Field(256, ge=16, le=512, description="Encoder max tokens per text.")
    batch_size: int = Field(64, ge=1, description="Encoder batch size when building the index.")
    use_gpu: Literal["auto", "never"] = Field(
        "auto", description="'auto' moves the index to GPU FAISS when the installed faiss has GPUs."
    )
    url: str | None = Field(
        None,
        description="URL of a retrieval worker (`gainrag worker retrieval`); unset: in-process.",
    )
    timeout_s: float = Field(10.0, gt=0, description="Deadline of one retrieval worker call.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Torch dtype of query encoding: 'auto' = fp16 on CUDA, bf16 on CPUs where "
        "it measures faster (docs/hardware.md), else fp32. Index building is always fp32.",
    )
    mode: Literal["dense", "hybrid"] = Field(
        "hybrid",
        description="'hybrid': the bi-encoder's FAISS list fused with BM25's over the same "
        "passages; 'dense': FAISS alone. Hybrid at the served settings: squad_dev acc +3.0 "
        "(19 wins / 2 losses, p < 0.001), nq_dev -1.1 (0 / 4, p = 0.125) (docs/evaluation.md, "
        "'Hybrid retrieval').",
    )
    fusion: Literal["rrf", "mix"] = Field(
        "mix",
        description="How hybrid retrieval fuses the two lists: reciprocal rank fusion, or a "
        "min-max mix of their scores weighted by `lexical_weight`.",
    )
    rrf_c: int = Field(60, ge=1, description="RRF's constant: 1 / (c + rank) per list.")
    lexical_weight: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="BM25's weight in the 'mix' fusion: (1 - w) * minmax(dense) + w * "
        "minmax(BM25) over each list's hits. 0.3: of 0.2, 0.3 and 0.5 end to end on both dev "
        "sets, the most net wins over dense without a significant loss on either "
        "(docs/evaluation.md, 'Hybrid retrieval').",
    )
    hybrid_score: Literal["fused", "dense"] = Field(
        "fused",
        description="The retrieval score hybrid retrieval reports (what the ranking mixes with "
        "the selector's): the fusion's, or each passage's dense cosine (the fusion then only "
        "chooses and orders the k candidates).",
    )
    fusion_depth: int = Field(
        100, ge=1, le=1000, description="Hits each list contributes before fusing (at least k)."
    )


class SelectorSettings(BaseModel):
    """The passage selector that scores (question, candidate) pairs."""

    kind: Literal["auto", "cross-encoder", "cosine"] = Field(
        "auto",
        description="'auto': the cross-encoder at `checkpoint` if set, else 'cosine' "
        "(bi-encoder cosine, no training needed; 'relevance' is accepted as its old name).",
    )
    checkpoint: Path | None = Field(
        Path("models/selector/gainrag-minilm-l6"),
        description="HF sequence-classification checkpoint of the cross-encoder: by default "
        "the GainRAG selector shipped in the repo (see its model card).",
    )
    rerank_checkpoint: Path = Field(
        Path("models/selector/relevance-minilm-l6"),
        description="The relevance warm-start cross-encoder: the 'rerank' eval baseline and the "
        "starting point of gain distillation.",
    )
    radio_checkpoint: Path = Field(
        Path("models/selector/radio-minilm-l6"),
        description="The RADIO-trained cross-encoder (`gainrag train radio`): the 'radio' and "
        "'radio-pseudo' eval presets.",
    )
    dro_checkpoint: Path = Field(
        Path("models/selector/dro-minilm-l6"),
        description="The DRO-trained cross-encoder (`gainrag train dro`): the 'dro' and "
        "'dro-pseudo' eval presets.",
    )
    max_length: int = Field(512, ge=16, le=2048, description="Max tokens of question + candidate.")
    batch_size: int = Field(
        0,
        ge=0,
        description="Pairs per forward pass; 0 = auto: 16 on CPU (fastest there), 128 on GPU.",
    )
    max_batch_pairs: int = Field(
        512, ge=1, description="Pair budget when batching concurrent requests together."
    )
    max_wait_ms: float = Field(2.0, ge=0, description="How long a batch waits for more requests.")
    max_queue: int = Field(64, ge=1, description="Queued requests before 429 Overloaded.")
    url: str | None = Field(
        None,
        description="Base URL of a selector worker (`gainrag worker selector`); unset: in-process.",
    )
    timeout_s: float = Field(30.0, gt=0, description="Deadline of one selector worker call.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Torch dtype of the cross-encoder: 'auto' = fp16 on CUDA, bf16 on CPUs "
        "where it measures faster (docs/hardware.md), else fp32.",
    )
    runtime: Literal["auto", "torch", "openvino"] = Field(
        "auto",
        description="What runs the cross-encoder on a CPU: 'openvino' (its bf16 kernels where "
        "the CPU has them, else f32), 'torch', or 'auto': OpenVINO where it is installed and "
        "a check on this machine passes (same top-1 as torch float32 on every probe question, "
        "Spearman >= 0.99, faster than torch; ~15 s once, cached), else torch. GPUs: torch.",
    )

    @field_validator("kind", mode="before")
    @classmethod
    def _old_kind_name(cls, value: object) -> object:
        # 'relevance' named the cosine fallback until it was told apart from the relevance-trained
        # cross-encoder (the 'rerank' baseline): configurations that still say it keep working.
        if value == "relevance":
            warnings.warn(
                "GAINRAG_SELECTOR__KIND=relevance is deprecated; it is now called 'cosine'",
                FutureWarning,
                stacklevel=1,
            )
            return "cosine"
        return value


class LLMSettings(BaseModel):
    """The LLM that writes the pseudo-passage and the answer."""

    backend: Literal["auto", "transformers", "openai", "llamacpp"] = Field(
        "auto",
        description="'openai': an OpenAI-compatible server (vLLM, llama.cpp) at `base_url`; "
        "'llamacpp': a managed local llama.cpp server on the model's GGUF (`make llm-engine`); "
        "'transformers': in-process torch; 'auto': openai when `base_url` is set, else llamacpp "
        "when the engine is built and the model is a GGUF, else transformers.",
    )
    model: str = Field(
        "qwen2.5-coder-1.5b",
        description="Bundled: 'qwen2.5-coder-1.5b' (the default: the best reader measured, "
        "docs/evaluation.md), 'qwen2.5-coder-0.5b', 'smollm2-135m' (the fast plumbing model), all "
        "GGUFs; or a local HF directory (transformers) or .gguf file (llamacpp). OpenAI backend: "
        "the served model name.",
    )
    base_url: str | None = Field(
        None, description="OpenAI-compatible API root, e.g. http://llm:8080/v1 (vLLM, llama.cpp)."
    )
    api_key: SecretStr | None = Field(None, description="Bearer token for the LLM server.")
    model_version: str | None = Field(
        None,
        description="OpenAI backend: a version for the served weights (goes into cache keys); "
        "default: the model name.",
    )
    timeout_s: float = Field(60.0, gt=0, description="OpenAI backend: deadline of one call.")
    connect_retries: int = Field(
        2, ge=0, le=10, description="OpenAI backend: retries on connection errors only."
    )
    max_connections: int = Field(64, ge=1, description="OpenAI backend: connection pool size.")
    models_dir: Path = Field(
        Path("~/.cache/gainrag/models"),
        description="Cache of converted models, shared by every checkout on the machine.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Torch dtype of the in-process LLM: 'auto' = fp16 on CUDA, bf16 on CPUs "
        "where it measures faster at batch 1 and max_batch_size (docs/hardware.md), else fp32.",
    )
    threads: int = Field(0, ge=0, description="Torch CPU threads (0 = torch default).")
    lora_adapter: Path | None = Field(
        None,
        description="A peft LoRA adapter directory merged into the in-process LLM at start-up "
        "(e.g. DRO's generator update, `gainrag train dro --generator-lora`); needs the "
        "transformers backend ('auto' picks it) and goes into the generator's version.",
    )
    engine_bin: Path = Field(
        Path("var/llama-server/llama-server"),
        description="llamacpp backend: the llama-server binary (`make llm-engine` builds it).",
    )
    engine_parallel: int = Field(
        4,
        ge=1,
        le=64,
        description="llamacpp backend: server slots, i.e. prompts decoded together (continuous "
        "batching); the context is this many times `engine_slot_ctx`.",
    )
    engine_slot_ctx: int = Field(
        0,
        ge=0,
        description="llamacpp backend: tokens of context per slot; 0 = max_input_tokens + the "
        "larger new-token budget (every admitted prompt fits).",
    )
    engine_threads: int = Field(
        0, ge=0, description="llamacpp backend: CPU threads (0 = the cores this process may use)."
    )
    engine_startup_s: float = Field(
        180.0, gt=0, description="llamacpp backend: deadline for the server to load the model."
    )
    max_new_tokens_pseudo: int = Field(
        160, ge=1, le=1024, description="Budget for the ~100-word pseudo-passage."
    )
    max_new_tokens_answer: int = Field(32, ge=1, le=512, description="Budget for the answer.")
    max_input_tokens: int = Field(
        4096, ge=64, description="Prompts over this many tokens are rejected with 422."
    )
    max_passage_words: int = Field(
        200, ge=1, description="Each passage is cut to this many words in the answer prompt."
    )
    max_batch_size: int = Field(8, ge=1, description="Prompts generated together in one batch.")
    max_wait_ms: float = Field(5.0, ge=0, description="How long a batch waits for more prompts.")
    max_queue: int = Field(64, ge=1, description="Queued prompts before 429 Overloaded.")


class PipelineSettings(BaseModel):
    """The answer path: (retrieve -> select_k) || (pseudo -> select_1) -> generate."""

    top_n: int = Field(
        1, ge=1, description="Passages given to the generator (request may override)."
    )
    max_top_n: int = Field(10, ge=1, description="Largest top_n a request may ask for.")
    retrieve: bool = Field(True, description="Retrieve passages (False = closed-book).")
    pseudo_passage: bool = Field(
        False,
        description="Write a pseudo-passage and let it compete. Off by default: with the default "
        "reader it lowered acc on both full dev sets (docs/evaluation.md, 'Full dev sets').",
    )
    select: bool = Field(
        True, description="Rescore candidates with the selector (else retrieval order)."
    )
    retrieval_weight: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Weight of the retriever's score in the ranking: candidates are ranked by "
        "(1 - w) * minmax(selector score) + w * minmax(retrieval score) over the question's "
        "candidates, and that mix is the score returned (the pseudo-passage's retrieval part is "
        "0, so at 0.5 it is almost never chosen). 0 = the selector alone; 1 = retrieval order. "
        "0.5: with the shipped selector +8.3 acc on nq_dev, level on squad_dev "
        "(docs/evaluation.md, 'Mixing in the retrieval score').",
    )
    select_top: int = Field(
        50,
        ge=0,
        description="Score only the retriever's top N of the k retrieved passages with the "
        "selector (0 = all k). The others keep their retrieval scores in the mix (normalised "
        "over all k, as when all are scored) and rank after every scored passage (at weight 0 "
        "their score is the lowest scored one's). 50 at k = 100: the same acc, EM and F1 as "
        "scoring all 100 on both full dev sets for half the selector's work "
        "(docs/evaluation.md, 'The k the service retrieves').",
    )
    pipelined_selection: bool = Field(
        True,
        description="Score the retrieved passages as soon as retrieval returns, while the "
        "pseudo-passage is still being written, and the pseudo-passage alone when it arrives "
        "(False = score all k+1 together after both). Same scores and answers either way.",
    )
    timeout_s: float = Field(120.0, gt=0, description="Deadline for one /answer request.")
    fallback: bool = Field(
        True,
        description="Degrade instead of failing: retrieval down -> the pseudo-passage only (no "
        "passage when it is off); selector down -> retrieval order (the response lists what "
        "degraded).",
    )

    @model_validator(mode="after")
    def _pseudo_needs_selector(self) -> PipelineSettings:
        # Without a selector nothing can rank the pseudo-passage against retrieved ones.
        if self.pseudo_passage and not self.select:
            raise ValueError("pipeline.pseudo_passage needs pipeline.select (a selector ranks it)")
        return self


Access = Literal["public", "key", "off"]


class ApiSettings(BaseModel):
    """HTTP gateway: limits, API keys, CORS and which auxiliary endpoints are exposed."""

    max_question_chars: int = Field(1000, ge=1, description="Longest question accepted.")
    max_body_bytes: int = Field(16_384, ge=256, description="Largest request body accepted.")
    max_in_flight: int = Field(32, ge=1, description="Concurrent /answer requests before 429.")
    max_question_tokens: int = Field(
        512,
        ge=1,
        description="Longest question in generator tokens, checked before admission "
        "(in-process generator only).",
    )
    passage_token_reserve: int = Field(
        300,
        ge=1,
        description="Tokens budgeted per passage when the answer prompt is checked against "
        "GAINRAG_LLM__MAX_INPUT_TOKENS before admission.",
    )
    keys_file: Path | None = Field(
        None,
        description="JSON-lines file of hashed API keys (`gainrag keys add`); unset = open API, "
        "no authentication.",
    )
    key_rate: float = Field(
        5.0, gt=0, description="Default requests per second of one API key (token bucket)."
    )
    key_burst: int = Field(10, ge=1, description="Default burst of one API key (bucket size).")
    key_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Default share of `max_in_flight` one API key may hold at once.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description='Origins allowed by CORS, as JSON (e.g. ["https://app.example"]); '
        "empty = CORS off.",
    )
    metrics_access: Access = Field(
        "public", description="GET /metrics: 'public', 'key' (any valid API key) or 'off'."
    )
    docs_access: Access = Field(
        "public",
        description="/docs, /redoc and /openapi.json: 'public', 'key' (any valid API key) "
        "or 'off'.",
    )
    playground: bool = Field(
        True,
        description="Serve the browser playground (a static page that calls the API with the "
        "caller's key) at GET /; off = 404.",
    )


class HttpSettings(BaseModel):
    """Connection-level limits of every gainrag HTTP server (gateway and workers)."""

    max_connections: int = Field(
        1024, ge=1, description="Open connections; more are answered 503 and closed."
    )
    max_header_bytes: int = Field(
        16_384, ge=1024, description="Largest request line + headers; over it: 431 and close."
    )
    max_headers: int = Field(100, ge=8, description="Most header lines; over it: 431 and close.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="Time to receive the request line and headers; then 408 and close."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="Time to receive the whole request body; then 408 and close."
    )
    keep_alive_s: int = Field(5, ge=1, description="Idle keep-alive connections are closed after.")
    drain_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM: /ready turns 503, new work gets 503, requests in flight get up "
        "to this long to finish before the process exits.",
    )


class RedisSettings(BaseModel):
    """Answer and pseudo-passage cache."""

    url: str | None = Field(None, description="redis://host:6379/0; unset = no cache.")
    ttl_s: int = Field(86_400, ge=1, description="Lifetime of a cached answer or pseudo-passage.")
    timeout_ms: float = Field(
        100.0, gt=0, description="Budget of one cache call; slower = answered without cache."
    )
    retry_s: float = Field(
        5.0, ge=0, description="After a cache failure, skip the cache this long before retrying."
    )
    prefix: str = Field("gainrag:", description="Key prefix (share one Redis between services).")


class DocumentSettings(BaseModel):
    """The documents API (``/v1/documents``): splitting and limits."""

    enabled: bool = Field(True, description="Serve /v1/documents (the in-process index only).")
    passage_words: int = Field(
        100, ge=10, le=400, description="Target passage length in words (the corpus's is 100)."
    )
    collection: str = Field("default", description="Collection of documents posted without one.")
    max_documents: int = Field(256, ge=1, description="Documents per POST /v1/documents.")
    max_document_chars: int = Field(
        1_000_000, ge=1, description="Longest document text accepted (characters)."
    )
    max_metadata_bytes: int = Field(
        8192, ge=2, description="Largest metadata object of one document (JSON bytes)."
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest POST /v1/documents body."
    )
    encode_batch: int = Field(32, ge=1, description="Passages per encoder pass when ingesting.")
    max_queue: int = Field(
        64, ge=1, description="Document writes waiting for the writer before 429 (one at a time)."
    )
    timeout_s: float = Field(
        600.0, gt=0, description="Deadline of a documents call to the retrieval worker."
    )


class TracingSettings(BaseModel):
    """OpenTelemetry traces of every request across the gateway, workers and LLM server."""

    exporter: Literal["none", "otlp", "file"] = Field(
        "none",
        description="'none': off; 'otlp': OTLP over HTTP to `endpoint` (a collector); 'file': "
        "one JSON line per finished span in `file` (tests, debugging).",
    )
    endpoint: str = Field(
        "http://127.0.0.1:4318",
        description="The OTLP/HTTP collector (`/v1/traces` is appended when missing).",
    )
    file: Path = Field(
        Path("var/traces/{service}.jsonl"),
        description="Span file of the 'file' exporter; {service} = gateway, retrieval, selector.",
    )
    sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0, description="Share of new traces recorded (workers follow the caller)."
    )
    service_name: str | None = Field(
        None, description="service.name of the spans; default gainrag-<process kind>."
    )


class FeedbackSettings(BaseModel):
    """Feedback on served answers: ``POST /v1/feedback`` and ``gainrag feedback export``."""

    enabled: bool = Field(
        True,
        description="Record every served answer (best effort, off the request path) and accept "
        "POST /v1/feedback on it; off: nothing is recorded and the route answers 403.",
    )
    backend: Literal["auto", "sqlite", "redis"] = Field(
        "auto",
        description="Where served answers and feedback live: 'sqlite' (a file: one machine), "
        "'redis' (shared by every gateway replica), 'auto': redis when `redis_url` or "
        "GAINRAG_REDIS__URL is set, else sqlite.",
    )
    path: Path | None = Field(
        None,
        description="The sqlite backend's file; unset: feedback.sqlite beside the index "
        "directory (var/feedback.sqlite by default).",
    )
    redis_url: str | None = Field(
        None,
        description="The redis backend's Redis; unset: GAINRAG_REDIS__URL. The shipped compose "
        "and Kubernetes Redis is a cache (no persistence, LRU eviction): to keep feedback, use "
        "one with persistence and noeviction, or export it often.",
    )
    max_records: int = Field(
        10_000, ge=1, description="Served answers kept for feedback; the oldest go first."
    )
    retention_s: int = Field(
        86_400,
        ge=1,
        description="Seconds a served answer can receive feedback; then it is deleted. "
        "Feedback given is kept.",
    )


class WorkerSettings(BaseModel):
    """The retrieval and selector workers."""

    retrieval_port: int = Field(8001, ge=1, le=65535, description="Port of the retrieval worker.")
    selector_port: int = Field(8002, ge=1, le=65535, description="Port of the selector worker.")
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token of the retrieval worker's POST /admin/reload-index; "
        "unset = endpoint disabled.",
    )
    max_queries: int = Field(256, ge=1, description="Queries per /retrieve request.")
    max_documents: int = Field(1024, ge=1, description="Documents per /rerank request.")
    max_text_chars: int = Field(20_000, ge=1, description="Longest query or document accepted.")
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body a worker accepts."
    )
    api_token: SecretStr | None = Field(
        None,
        description="Bearer token required on /retrieve and /rerank (the gateway sends it); "
        "unset = open.",
    )


def _fmt_default(value: object) -> str:
    return "unset" if value is None else str(value)


class Settings(BaseSettings):
    """All gainrag settings. Environment variables override defaults (``GAINRAG_``, ``__``)."""

    model_config = SettingsConfigDict(
        env_prefix="GAINRAG_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    host: str = Field("127.0.0.1", description="Bind address of `gainrag serve`.")
    port: int = Field(8000, ge=1, le=65535, description="Port of `gainrag serve`.")
    log_level: str = Field("INFO", description="Python log level.")
    home: Path = Field(
        REPO_ROOT, description="Base for relative paths (models, index, data); the repo by default."
    )
    retrieval: RetrievalSettings = RetrievalSettings()
    selector: SelectorSettings = SelectorSettings()
    llm: LLMSettings = LLMSettings()
    pipeline: PipelineSettings = PipelineSettings()
    api: ApiSettings = ApiSettings()
    http: HttpSettings = HttpSettings()
    redis: RedisSettings = RedisSettings()
    worker: WorkerSettings = WorkerSettings()
    tracing: TracingSettings = TracingSettings()
    documents: DocumentSettings = DocumentSettings()
    feedback: FeedbackSettings = FeedbackSettings()

    @classmethod
    def env_reference(cls) -> list[tuple[str, str, str]]:
        """(environment variable, default, description) for every setting, for the docs."""
        rows: list[tuple[str, str, str]] = []
        for name, field in cls.model_fields.items():
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                for sname, sfield in sub.model_fields.items():
                    default = sfield.get_default(call_default_factory=True)
                    rows.append(
                        (
                            f"GAINRAG_{name.upper()}__{sname.upper()}",
                            _fmt_default(default),
                            sfield.description or "",
                        )
                    )
            else:
                default = "repo root" if name == "home" else _fmt_default(field.default)
                rows.append((f"GAINRAG_{name.upper()}", default, field.description or ""))
        return rows

    @model_validator(mode="after")
    def _resolve_paths(self) -> Settings:
        # Relative paths are resolved against `home` so the service behaves the same from any cwd.
        def fix(p: Path) -> Path:
            p = p.expanduser()
            return p if p.is_absolute() else (self.home / p)

        self.retrieval.index_dir = fix(self.retrieval.index_dir)
        self.retrieval.corpus = fix(self.retrieval.corpus)
        self.llm.models_dir = fix(self.llm.models_dir)
        self.llm.engine_bin = fix(self.llm.engine_bin)
        if self.llm.lora_adapter is not None:
            self.llm.lora_adapter = fix(self.llm.lora_adapter)
        if self.selector.checkpoint is not None:
            self.selector.checkpoint = fix(self.selector.checkpoint)
        self.selector.rerank_checkpoint = fix(self.selector.rerank_checkpoint)
        self.selector.radio_checkpoint = fix(self.selector.radio_checkpoint)
        self.selector.dro_checkpoint = fix(self.selector.dro_checkpoint)
        if self.api.keys_file is not None:
            self.api.keys_file = fix(self.api.keys_file)
        self.tracing.file = fix(self.tracing.file)
        return self
