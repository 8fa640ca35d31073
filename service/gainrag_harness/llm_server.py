"""``make llm-server``: the bundled SmolLM2 behind llama.cpp's OpenAI-compatible ``llama-server``,
with the same command line the tests use (:func:`gainrag_harness.stack.llama_service`), in the
foreground until Ctrl-C.

    python -m gainrag_harness.llm_server [--port 8080] [--gguf FILE --alias NAME] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

from gainrag.config import REPO_ROOT
from gainrag_harness.stack import LLM_ALIAS, llama_service


def main(argv: list[str] | None = None) -> int:
    """Start the server, print its URL, wait for SIGINT/SIGTERM, stop it."""
    p = argparse.ArgumentParser(prog="python -m gainrag_harness.llm_server", description=__doc__)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--gguf", type=Path, default=None, help="default: the bundled SmolLM2")
    p.add_argument("--alias", default=LLM_ALIAS, help="the model name clients send")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=2, help="slots (continuous batching)")
    args = p.parse_args(argv)
    log_dir = REPO_ROOT / "var" / "llm-server"
    service = llama_service(
        log_dir,
        port=args.port,
        gguf=args.gguf,
        alias=args.alias,
        threads=args.threads,
        parallel=args.parallel,
    )
    with service:
        print(f"{args.alias} on {service.url}/v1 (log: {service.log_path}); Ctrl-C stops it")
        print(
            f"  GAINRAG_LLM__BACKEND=openai GAINRAG_LLM__BASE_URL={service.url}/v1 "
            f"GAINRAG_LLM__MODEL={args.alias}"
        )
        sys.stdout.flush()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
