"""The ``gainrag`` command line: prepare, index build, serve, eval, keys, settings."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from gainrag.config import Settings
from gainrag.errors import ConfigurationError, GainRAGError
from gainrag.logs import setup_logging

log = logging.getLogger("gainrag")


def _index_build(settings: Settings, corpus: Path | None, out: Path | None, force: bool) -> None:
    from gainrag.retrieval.encoder import BiEncoder
    from gainrag.retrieval.index import build_index, read_manifest
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
        print(
            f"index at {out} is up to date ({manifest['count']} passages, "
            f"version {manifest['version']})"
        )
        return
    encoder = BiEncoder.from_settings(r)
    manifest = build_index(corpus, out, encoder, batch_size=r.batch_size)
    print(
        f"built index at {out}: {manifest['count']} passages in {manifest['built_seconds']} s, "
        f"version {manifest['version']}"
    )


def _prepare(settings: Settings) -> None:
    from gainrag.models import prepare_llm

    t = time.perf_counter()
    path = prepare_llm(settings.llm.model, settings.llm.models_dir)
    print(f"LLM {settings.llm.model} ready at {path} ({time.perf_counter() - t:.1f} s)")
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
        from gainrag.retrieval.index import read_manifest
        from gainrag.retrieval.worker import create_retrieval_app

        if read_manifest(settings.retrieval.index_dir) is None:
            raise ConfigurationError(
                f"no index at {settings.retrieval.index_dir}; run `gainrag index build`"
            )
        app, default_port = create_retrieval_app(settings), w.retrieval_port
    else:
        from gainrag.selector.worker import create_selector_app

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
    )
    append_key(path, record)
    print(key)
    print(f"added key '{args.name}' to {path}; the key is shown only this once", file=sys.stderr)


def _eval(settings: Settings, args: argparse.Namespace) -> None:
    from gainrag.evaluation.harness import format_table, run_eval

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
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.output}")


def _train(settings: Settings, args: argparse.Namespace) -> None:
    if args.train_cmd == "gain-signals":
        from gainrag.training.gain_signals import synthesize, training_questions

        questions = training_questions(args.questions, args.limit, args.seed)
        stats = synthesize(
            settings,
            questions,
            args.output,
            k=args.k,
            alpha=args.alpha,
            batch_questions=args.batch_questions,
            shard=args.shard,
        )
        print(
            f"gain signals: {stats['written']} written, {stats['skipped']} already done "
            f"-> {args.output}"
        )
    elif args.train_cmd in ("relevance", "selector"):
        _train_selector(settings, args)
    elif args.train_cmd == "selector-data":
        from gainrag.training.selector_data import write_groups

        n = write_groups(args.input, args.output, group_size=args.group_size, seed=args.seed)
        print(f"selector data: {n} groups of {args.group_size} -> {args.output}")


def _train_selector(settings: Settings, args: argparse.Namespace) -> None:
    from gainrag.training.selector_train import TrainConfig, load_groups, train_selector

    cfg = TrainConfig(
        loss="infonce" if args.train_cmd == "relevance" else "kl",
        lr=args.lr,
        epochs=args.epochs,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        max_length=args.max_length,
        groups_per_step=args.groups_per_step,
        seed=args.seed,
        save_every=args.save_every,
    )
    if args.train_cmd == "relevance":
        from gainrag.models import resolve_encoder
        from gainrag.retrieval.encoder import BiEncoder
        from gainrag.retrieval.local import LocalRetriever
        from gainrag.training.gain_signals import training_questions
        from gainrag.training.relevance_data import relevance_groups

        r = settings.retrieval
        retriever = LocalRetriever.from_settings(r, BiEncoder.from_settings(r))
        questions = training_questions(args.questions, args.limit, args.seed)
        groups = relevance_groups(
            retriever, questions, group_size=args.group_size, k=args.k, seed=args.seed
        )
        print(f"relevance: {len(groups)} groups from {len(questions)} questions")
        init = resolve_encoder(args.init)
    else:
        groups = load_groups(args.groups)
        init = args.init or settings.selector.rerank_checkpoint
        if not (init / "config.json").is_file():
            raise ConfigurationError(f"no warm-start checkpoint at {init} (--init)")
    meta = train_selector(init, groups, args.out, cfg, stop_after_steps=args.stop_after_steps)
    if meta is None:
        print(f"stopped after {args.stop_after_steps} steps; rerun the same command to resume")
        return
    print(
        f"selector checkpoint -> {args.out} ({meta['steps']} steps, loss "
        f"{meta['loss_first_50']:.4f} -> {meta['loss_last_50']:.4f})"
    )


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, e.g. 0/2, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard {text!r}: need 0 <= I < N")
    return i, n


def question_args(parser: argparse.ArgumentParser, help_: str) -> None:
    """--questions FILE... and --limit, shared by the jobs that read training questions."""
    parser.add_argument("--questions", type=Path, nargs="+", required=True, help=help_)
    parser.add_argument("--limit", type=int, help="questions per file (seeded random sample)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    from gainrag.evaluation.harness import PRESETS

    p = argparse.ArgumentParser(prog="gainrag", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    sub.add_parser("prepare", help="convert the LLM once and build the index if missing")

    idx = sub.add_parser("index", help="index commands").add_subparsers(
        dest="index_cmd", required=True
    )
    b = idx.add_parser("build", help="encode a corpus into a FAISS index directory")
    b.add_argument("--corpus", type=Path, help="corpus JSONL (default: settings)")
    b.add_argument("--out", type=Path, help="output directory (default: settings)")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")

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
    e.add_argument("--output", type=Path, help="write the JSON report here")
    e.add_argument(
        "--generation-memo",
        type=Path,
        help="JSONL memo of greedy generations, shared across runs (skips repeated prompts)",
    )

    t = sub.add_parser("train", help="offline training jobs").add_subparsers(
        dest="train_cmd", required=True
    )
    g = t.add_parser("gain-signals", help="label candidates with contrastive PPL (resumable)")
    question_args(g, "JSONL files with question and answers")
    g.add_argument("--output", type=Path, required=True, help="JSONL to append to")
    g.add_argument("--k", type=int, default=20, help="retrieved candidates per question")
    g.add_argument("--alpha", type=float, default=0.5, help="contrastive weight")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-questions", type=int, default=8)
    g.add_argument(
        "--shard",
        type=_shard,
        default=(0, 1),
        metavar="I/N",
        help="process every N-th question from the I-th (0-based), to spread over processes",
    )
    sd = t.add_parser("selector-data", help="gain signals -> distillation groups")
    sd.add_argument("--input", type=Path, required=True, help="gain-signals JSONL")
    sd.add_argument("--output", type=Path, required=True, help="groups JSONL")
    sd.add_argument("--group-size", type=int, default=16)
    sd.add_argument("--seed", type=int, default=0)

    def training_args(parser: argparse.ArgumentParser, lr: float, epochs: int) -> None:
        parser.add_argument("--out", type=Path, required=True, help="checkpoint directory")
        parser.add_argument("--lr", type=float, default=lr)
        parser.add_argument("--epochs", type=int, default=epochs)
        parser.add_argument("--warmup-ratio", type=float, default=0.1)
        parser.add_argument("--weight-decay", type=float, default=0.01)
        parser.add_argument("--max-length", type=int, default=512)
        parser.add_argument("--groups-per-step", type=int, default=1)
        parser.add_argument("--save-every", type=int, default=200)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument(
            "--stop-after-steps", type=int, help="end this run early (resumable), to time-box it"
        )

    rel = t.add_parser("relevance", help="relevance warm start: gold vs hard negatives, InfoNCE")
    question_args(rel, "JSONL files with question, answers, gold_ids")
    rel.add_argument(
        "--init",
        default="all-MiniLM-L6-v2",
        help="bare encoder (bundled name or directory) or a checkpoint",
    )
    rel.add_argument("--group-size", type=int, default=16)
    rel.add_argument("--k", type=int, default=50, help="retrieved passages to mine negatives")
    training_args(rel, lr=3e-5, epochs=1)
    dis = t.add_parser("selector", help="distil gain labels into the selector (KL)")
    dis.add_argument("--groups", type=Path, required=True, help="selector-data JSONL")
    dis.add_argument(
        "--init",
        type=Path,
        help="relevance warm-start checkpoint (default: GAINRAG_SELECTOR__RERANK_CHECKPOINT)",
    )
    training_args(dis, lr=6e-5, epochs=2)

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
    k.add_parser("hash", help="print the sha256 of a key read from stdin (for a keys file)")

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
            _index_build(settings, args.corpus, args.out, args.force)
        elif args.cmd == "serve":
            _serve(settings, args.host, args.port)
        elif args.cmd == "worker":
            _worker(settings, args.kind, args.host, args.port)
        elif args.cmd == "keys":
            _keys(settings, args)
        elif args.cmd == "eval":
            _eval(settings, args)
        elif args.cmd == "train":
            _train(settings, args)
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
