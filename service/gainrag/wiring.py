"""The one place that names concrete backends: settings in, built components out.

The gateway (:func:`build_components`), ``gainrag eval`` and the selector worker
(:func:`build_cross_encoder`) build their models here. Every backend is imported inside the
function that builds it, so a process loads only what its settings ask for: an OpenAI-backed
gateway never imports torch, one with remote workers never loads FAISS, and a worker that builds
its model here does not load the pipeline or the cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from gainrag.config import Settings
from gainrag.errors import ConfigurationError
from gainrag.llm.interface import Generator
from gainrag.retrieval.interface import Documents, Retriever
from gainrag.selector.interface import Selector
from gainrag.weights import BUNDLED_LLMS

if TYPE_CHECKING:
    from gainrag.cache_interface import CacheStore
    from gainrag.pipeline import Components


def build_components(settings: Settings) -> Components:
    """Build what the settings ask for (once, at start-up): remote clients where a worker URL is
    set, in-process models otherwise."""
    from gainrag.pipeline import Components

    o, r, s = settings.pipeline, settings.retrieval, settings.selector
    api_token = settings.worker.api_token
    worker_token = api_token.get_secret_value() if api_token is not None else None

    generator = build_llm(settings)

    kind = s.kind
    if kind == "auto":
        kind = "cross-encoder" if s.checkpoint is not None else "cosine"
    local_retrieval = o.retrieve and r.url is None
    local_selector = o.select and s.url is None
    encoder = None
    if local_retrieval or (local_selector and kind == "cosine"):
        from gainrag.retrieval.encoder import BiEncoder

        encoder = BiEncoder.from_settings(r)

    retriever: Retriever | None = None
    if o.retrieve and r.url is not None:
        from gainrag.retrieval.remote import RemoteRetriever

        retriever = RemoteRetriever(r.url, timeout_s=r.timeout_s, token=worker_token)
    elif local_retrieval:
        from gainrag.retrieval.local import LocalRetriever

        assert encoder is not None
        retriever = LocalRetriever.from_settings(r, encoder)

    selector: Selector | None = None
    if o.select and s.url is not None:
        from gainrag.selector.remote import RemoteSelector

        selector = RemoteSelector(s.url, timeout_s=s.timeout_s, token=worker_token)
    elif local_selector and kind == "cross-encoder":
        selector = build_cross_encoder(settings)
    elif local_selector:
        from gainrag.selector.cosine import CosineSelector

        assert encoder is not None
        index = getattr(retriever, "index", None)
        selector = CosineSelector(encoder, index, max_queue=s.max_queue)

    return Components(
        retriever=retriever,
        selector=selector,
        generator=generator,
        cache=build_cache(settings),
        documents=build_documents(settings, retriever, worker_token),
    )


def build_documents(
    settings: Settings, retriever: Retriever | None, worker_token: str | None
) -> Documents | None:
    """The documents API's backend: the in-process index, or the retrieval worker's."""
    r, d = settings.retrieval, settings.documents
    if not d.enabled or retriever is None:
        return None
    if r.url is not None:
        from gainrag.retrieval.remote import RemoteDocuments, RemoteRetriever

        remote = retriever if isinstance(retriever, RemoteRetriever) else None
        return RemoteDocuments(r.url, timeout_s=d.timeout_s, token=worker_token, retriever=remote)
    from gainrag.retrieval.documents import LocalDocuments
    from gainrag.retrieval.encoder import BiEncoder
    from gainrag.retrieval.local import LocalRetriever

    assert isinstance(retriever, LocalRetriever)
    return LocalDocuments(retriever, d, lambda: BiEncoder.from_settings(r, dtype="float32"))


def build_llm(settings: Settings) -> Generator:
    """The generator of the settings (an OpenAI-compatible server, the managed llama.cpp engine
    or in-process transformers, see :func:`llm_backend`); also the reader of offline jobs (gain
    signals, training-data filtering)."""
    llm = settings.llm
    backend = llm_backend(settings)
    if llm.lora_adapter is not None and backend != "transformers":
        raise ConfigurationError(
            f"GAINRAG_LLM__LORA_ADAPTER is applied by the in-process transformers backend, not "
            f"by {backend!r}: set GAINRAG_LLM__BACKEND=transformers (or serve the adapter from "
            "the LLM server itself, e.g. vLLM --lora-modules)"
        )
    if backend == "openai":
        from gainrag.llm.openai_backend import OpenAIGenerator

        if not llm.base_url:
            raise ConfigurationError("GAINRAG_LLM__BACKEND=openai needs GAINRAG_LLM__BASE_URL")
        return OpenAIGenerator(llm)
    if backend == "llamacpp":
        return build_llamacpp(settings)
    import torch

    from gainrag.weights import prepare_llm

    if llm.threads > 0:
        torch.set_num_threads(llm.threads)
    return build_generator(settings, prepare_llm(llm.model, llm.models_dir))


def llm_backend(settings: Settings) -> str:
    """The LLM backend ``auto`` means here: the OpenAI client when a server URL is set; else the
    managed llama.cpp engine when its binary is built and the model is a GGUF (bundled or a
    .gguf path); else in-process transformers (a local HF directory, or no engine built)."""
    llm = settings.llm
    if llm.backend != "auto":
        return llm.backend
    if llm.base_url is not None:
        return "openai"
    if llm.lora_adapter is not None:  # only the in-process model can merge an adapter
        return "transformers"
    gguf_model = llm.model in BUNDLED_LLMS or llm.model.endswith(".gguf")
    if gguf_model and os.access(llm.engine_bin, os.X_OK):
        return "llamacpp"
    return "transformers"


def build_llamacpp(settings: Settings) -> Generator:
    """The managed llama.cpp engine on the model's verified GGUF (started here, stopped by its
    ``close``)."""
    from gainrag.llm.llamacpp_engine import LlamaCppGenerator
    from gainrag.util import file_sha256
    from gainrag.weights import gguf_path, gguf_sha256, gguf_tokenizer

    llm = settings.llm
    gguf = gguf_path(llm.model, llm.models_dir)
    return LlamaCppGenerator.start(
        llm,
        gguf=gguf,
        tokenizer_dir=gguf_tokenizer(llm.model, llm.models_dir),
        gguf_sha256=gguf_sha256(llm.model) or file_sha256(gguf),
    )


def build_cache(settings: Settings) -> CacheStore | None:
    """The Redis cache, when ``GAINRAG_REDIS__URL`` is set."""
    if not settings.redis.url:
        return None
    from gainrag.cache import Cache

    return Cache(settings.redis)


def build_cross_encoder(settings: Settings) -> Selector:
    """The in-process cross-encoder selector of the settings (also the selector worker's model)."""
    from gainrag.selector.cross_encoder import CrossEncoderSelector

    s = settings.selector
    if s.checkpoint is None:
        raise ConfigurationError("selector kind 'cross-encoder' needs GAINRAG_SELECTOR__CHECKPOINT")
    if not (s.checkpoint / "config.json").is_file():
        raise ConfigurationError(
            f"no selector checkpoint at {s.checkpoint} (GAINRAG_SELECTOR__CHECKPOINT); "
            "train one with `gainrag train selector` or set GAINRAG_SELECTOR__KIND=cosine for "
            "the untrained fallback (GAINRAG_SELECTOR__KIND=relevance, its old name, works too)"
        )
    return CrossEncoderSelector(
        s.checkpoint,
        max_length=s.max_length,
        batch_size=s.batch_size,
        max_batch_pairs=s.max_batch_pairs,
        max_wait_s=s.max_wait_ms / 1000.0,
        max_queue=s.max_queue,
        dtype=s.dtype,
        runtime=s.runtime,
    )


def build_generator(settings: Settings, path: Path) -> Generator:
    """The in-process transformers generator of the model at ``path``."""
    from gainrag.llm.transformers_backend import TransformersGenerator

    llm = settings.llm
    return TransformersGenerator(
        path,
        dtype=llm.dtype,
        max_input_tokens=llm.max_input_tokens,
        max_batch_size=llm.max_batch_size,
        max_wait_s=llm.max_wait_ms / 1000.0,
        max_queue=llm.max_queue,
        lora_adapter=llm.lora_adapter,
    )
