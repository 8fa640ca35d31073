"""The ``gainrag`` command line: prepare, index build, serve, eval, keys, settings."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from gainrag.config import Settings
from gainrag.errors import ConfigurationError, GainRAGError
from gainrag.logs import setup_logging

log = logging.getLogger("gainrag")


def _index_build(
    settings: Settings,
    corpus: Path | None,
    out: Path | None,
    force: bool,
    discard_documents: bool = False,
) -> None:
    from gainrag.retrieval.encoder import BiEncoder
    from gainrag.retrieval.index import (
        build_index,
        migrate_v1,
        read_manifest,
        writes_since_build,
    )
    from gainrag.util import file_sha256

    r = settings.retrieval
    corpus = corpus or r.corpus
    out = out or r.index_dir
    manifest = read_manifest(out)
    if (
        not force
        and manifest is not None
        and manifest.get("encoder") == r.encoder
        and manifest.get("max_length") == r.max_length
        and manifest.get("corpus_sha256") == file_sha256(corpus)
    ):
        if manifest.get("format") == 1:
            # here, where the directory is writable (a serving mount may be read-only)
            migrate_v1(out)
            print(f"index at {out} migrated to the passage store (version {manifest['version']})")
            return
        print(
            f"index at {out} is up to date ({manifest['count']} passages, "
            f"version {manifest['version']})"
        )
        return
    writes = writes_since_build(out)
    if writes and not discard_documents:
        # a rebuild starts from the corpus alone: acknowledged writes would be lost
        raise ConfigurationError(
            f"the index at {out} has {writes} writes through the documents API since it was "
            "built; a rebuild would undo them: pass --discard-documents to rebuild anyway, or "
            "--out another directory"
        )
    encoder = BiEncoder.from_settings(r, dtype="float32")  # index vectors: always fp32
    manifest = build_index(corpus, out, encoder, batch_size=r.batch_size)
    print(
        f"built index at {out}: {manifest['count']} passages in {manifest['built_seconds']} s, "
        f"version {manifest['version']}"
    )


def _prepare(settings: Settings) -> None:
    from gainrag.weights import gguf_path, gguf_tokenizer, prepare_llm
    from gainrag.wiring import llm_backend

    t = time.perf_counter()
    llm = settings.llm
    backend = llm_backend(settings)
    if backend == "llamacpp":  # the GGUF itself (assembled, verified) and its tokenizer
        path = gguf_path(llm.model, llm.models_dir)
        gguf_tokenizer(llm.model, llm.models_dir)
    elif backend == "transformers":  # de-quantised once into a safetensors checkpoint
        path = prepare_llm(llm.model, llm.models_dir)
    if backend != "openai":
        print(f"LLM {llm.model} ({backend}) ready at {path} ({time.perf_counter() - t:.1f} s)")
    _index_build(settings, None, None, force=False)


def _serve(settings: Settings, host: str | None, port: int | None) -> None:
    from gainrag.api import create_app
    from gainrag.api.server import serve
    from gainrag.retrieval.index import read_manifest

    # Fail fast on the common mistake instead of serving a gateway that never becomes ready.
    r = settings.retrieval
    if settings.pipeline.retrieve and r.url is None and read_manifest(r.index_dir) is None:
        raise ConfigurationError(
            f"no index at {settings.retrieval.index_dir}; run `gainrag prepare` (or `make run`)"
        )

    serve(
        create_app(settings), settings.http, host=host or settings.host, port=port or settings.port
    )


def _worker(settings: Settings, kind: str, host: str | None, port: int | None) -> None:
    from fastapi import FastAPI

    from gainrag.api.server import serve

    w = settings.worker
    app: FastAPI
    if kind == "retrieval":
        from gainrag.api.workers.retrieval import create_retrieval_app
        from gainrag.retrieval.index import read_manifest

        if read_manifest(settings.retrieval.index_dir) is None:
            raise ConfigurationError(
                f"no index at {settings.retrieval.index_dir}; run `gainrag index build`"
            )
        app, default_port = create_retrieval_app(settings), w.retrieval_port
    else:
        from gainrag.api.workers.selector import create_selector_app

        app, default_port = create_selector_app(settings), w.selector_port
    serve(app, settings.http, host=host or settings.host, port=port or default_port)


def _keys(settings: Settings, args: argparse.Namespace) -> None:
    from gainrag.keys import KeyRecord, append_key, hash_key, new_key

    if args.keys_cmd == "hash":
        # From stdin, not argv: a key on the command line would land in the shell history.
        key = sys.stdin.readline().strip()
        if not key:
            raise ConfigurationError("no key on stdin")
        print(hash_key(key))
        return
    path = args.file or settings.api.keys_file
    if path is None:
        raise ConfigurationError("no keys file: pass --file or set GAINRAG_API__KEYS_FILE")
    key = new_key()
    record = KeyRecord(
        name=args.name,
        sha256=hash_key(key),
        rate=args.rate,
        burst=args.burst,
        max_in_flight=args.max_in_flight,
        can_refresh=args.can_refresh,
        can_write=args.can_write,
    )
    append_key(path, record)
    print(key)
    print(f"added key '{args.name}' to {path}; the key is shown only this once", file=sys.stderr)


def _eval(settings: Settings, args: argparse.Namespace) -> None:
    from gainrag.evaluation.harness import format_table, run_eval
    from gainrag.evaluation.report import write_report

    report = asyncio.run(
        run_eval(
            settings,
            args.questions,
            args.preset,
            limit=args.limit,
            concurrency=args.concurrency,
            top_n=args.top_n,
            generation_memo=args.generation_memo,
        )
    )
    report["command"] = " ".join(["gainrag", *sys.argv[1:]])
    print(format_table([report]))
    if args.output:
        records = write_report(args.output, report)
        print(f"wrote {args.output} and its records {records}")


def _train(settings: Settings, args: argparse.Namespace) -> None:
    from gainrag.training import plans, recipes

    if args.train_cmd in (None, "recipes"):
        print(recipes.listing())
    elif args.train_cmd == "plan":
        plans.main(args)
    else:
        args.job.run(settings, args)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    """``gainrag train``: the signal jobs and recipes found in gainrag.training, and plans."""
    from gainrag.training import plans, recipes, signals

    t = sub.add_parser(
        "train", help="offline training jobs (no arguments: list the recipes)"
    ).add_subparsers(dest="train_cmd")
    t.add_parser("recipes", help="list the selector training recipes")
    for job in [*signals.jobs().values(), *recipes.recipes().values()]:
        jp = t.add_parser(job.name, aliases=list(job.aliases), help=job.summary)
        job.add_arguments(jp)
        jp.set_defaults(job=job)
    plans.add_arguments(t.add_parser("plan", help="print (or --run) a plan's exact commands"))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    from gainrag.evaluation.harness import PRESETS

    p = argparse.ArgumentParser(prog="gainrag", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    sub.add_parser("prepare", help="convert the LLM once and build the index if missing")

    idx = sub.add_parser("index", help="index commands").add_subparsers(
        dest="index_cmd", required=True
    )
    b = idx.add_parser("build", help="encode a corpus into an index directory (store + FAISS)")
    b.add_argument("--corpus", type=Path, help="corpus JSONL (default: settings)")
    b.add_argument("--out", type=Path, help="output directory (default: settings)")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.add_argument(
        "--discard-documents",
        action="store_true",
        help="rebuild even if documents were posted through the API (they are dropped)",
    )

    s = sub.add_parser("serve", help="serve the HTTP API")
    s.add_argument("--host")
    s.add_argument("--port", type=int)

    w = sub.add_parser("worker", help="serve one stage as a worker for a remote gateway")
    w.add_argument("kind", choices=["retrieval", "selector"])
    w.add_argument("--host", help="bind address (default GAINRAG_HOST)")
    w.add_argument("--port", type=int, help="default: 8001 (retrieval) or 8002 (selector)")

    e = sub.add_parser("eval", help="evaluate a pipeline preset on a question file")
    e.add_argument("--questions", type=Path, required=True, help="JSONL with question, answers")
    e.add_argument("--preset", choices=sorted(PRESETS), default="gainrag")
    e.add_argument("--limit", type=int, help="first N questions")
    e.add_argument("--top-n", type=int, help="passages given to the generator")
    e.add_argument("--concurrency", type=int, default=8, help="questions in flight")
    e.add_argument(
        "--output",
        type=Path,
        help="write the report summary here (X.json) and its records beside it "
        "(X.questions.jsonl.gz)",
    )
    e.add_argument(
        "--generation-memo",
        type=Path,
        help="JSONL memo of greedy generations, shared across runs (skips repeated prompts)",
    )

    from gainrag.evaluation import compare

    c = sub.add_parser(
        "compare", help="two eval reports question by question: wins and losses in buckets"
    )
    compare.add_arguments(c)

    _train_parser(sub)

    k = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_cmd", required=True)
    ka = k.add_parser("add", help="create a key: print it once, append its hash to the keys file")
    ka.add_argument("name", help="the key's name (shown in logs, never the key)")
    ka.add_argument("--file", type=Path, help="keys file (default: GAINRAG_API__KEYS_FILE)")
    ka.add_argument("--rate", type=float, help="requests/s (default: GAINRAG_API__KEY_RATE)")
    ka.add_argument("--burst", type=int, help="bucket size (default: GAINRAG_API__KEY_BURST)")
    ka.add_argument(
        "--max-in-flight", type=int, help="concurrent requests (default: GAINRAG_API__KEY_SHARE)"
    )
    ka.add_argument(
        "--can-refresh", action="store_true", help="may bypass the cache (Cache-Control: no-cache)"
    )
    ka.add_argument(
        "--can-write", action="store_true", help="may add and delete documents (/v1/documents)"
    )
    k.add_parser("hash", help="print the sha256 of a key read from stdin (for a keys file)")

    fb = sub.add_parser("feedback", help="feedback on served answers (POST /v1/feedback)")
    fe = fb.add_subparsers(dest="feedback_cmd", required=True).add_parser(
        "export", help="write the stored feedback as training questions (docs/training.md)"
    )
    fe.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    fe.add_argument(
        "--since", help="only feedback given since: ISO 8601 (UTC unless it says) or an age (7d)"
    )
    fe.add_argument("--rating", choices=["up", "down"], help="only feedback with this rating")

    st = sub.add_parser("settings", help="print the effective settings as JSON")
    st.add_argument("--markdown", action="store_true", help="print the env-variable reference")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gainrag`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"gainrag: invalid settings (GAINRAG_* environment or .env):\n{exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        if args.cmd == "prepare":
            _prepare(settings)
        elif args.cmd == "index":
            _index_build(settings, args.corpus, args.out, args.force, args.discard_documents)
        elif args.cmd == "serve":
            _serve(settings, args.host, args.port)
        elif args.cmd == "worker":
            _worker(settings, args.kind, args.host, args.port)
        elif args.cmd == "keys":
            _keys(settings, args)
        elif args.cmd == "eval":
            _eval(settings, args)
        elif args.cmd == "compare":
            from gainrag.evaluation import compare

            compare.main(args)
        elif args.cmd == "train":
            _train(settings, args)
        elif args.cmd == "feedback":
            from gainrag.feedback import export_command

            export_command(settings, args)
        elif args.cmd == "settings" and args.markdown:
            print("| variable | default | meaning |\n|---|---|---|")
            for var, default, desc in Settings.env_reference():
                print(f"| `{var}` | `{default}` | {desc} |")
        elif args.cmd == "settings":
            print(settings.model_dump_json(indent=2))
    except GainRAGError as exc:
        print(f"gainrag: error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
