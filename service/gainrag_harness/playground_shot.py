"""The README's playground screenshot, taken from the configuration ``make run`` serves.

Starts ``gainrag serve`` with the default settings (nothing overridden but the port: the default
reader, index, selector and pipeline options of this checkout; run ``make prepare`` first), asks
one dev question in headless Chromium with its gold answers in the "expected" field, waits for
the streamed answer and saves the top of the page:

    python -m gainrag_harness.playground_shot [--out docs/img/playground.png] [--question ID]

It prints the answer and the models the page shows, to be checked against the image.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from gainrag.config import REPO_ROOT
from gainrag_harness.browser import chromium, fill, screenshot, wait_for
from gainrag_harness.process import free_port
from gainrag_harness.stack import gainrag_service

DEV = REPO_ROOT / "data" / "questions" / "nq_dev.jsonl"


def _question(qid: str) -> dict[str, object]:
    with DEV.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["id"] == qid:
                return dict(row)
    raise SystemExit(f"no question {qid} in {DEV}")


def main(argv: list[str] | None = None) -> int:
    """Serve, ask, wait for ``done``, save the screenshot."""
    p = argparse.ArgumentParser(prog="python -m gainrag_harness.playground_shot")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "img" / "playground.png")
    p.add_argument("--question", default="nq-00000", help="a question id of nq_dev")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for start and answer")
    # The default k = 100 lists 100 candidates: the top of the page shows the answer, the
    # selected passage, the timings and the first ~20 of them.
    p.add_argument("--height", type=int, default=1400, help="pixels of the page, from the top")
    args = p.parse_args(argv)
    q = _question(args.question)
    logs = Path(tempfile.mkdtemp(prefix="playground-shot-"))
    # No GAINRAG_* settings: the defaults are what the screenshot is to show.
    gateway = gainrag_service("gateway", ["serve"], logs, port=free_port(), timeout_s=args.timeout)
    with gateway, chromium() as driver:
        driver.get(gateway.url + "/")
        fill(driver, "question", str(q["question"]))
        fill(driver, "expected", " | ".join(q["answers"]))  # type: ignore[arg-type]
        driver.find_element("id", "submit").click()
        state = lambda d: d.find_element("id", "app").get_attribute("data-state")  # noqa: E731
        wait_for(driver, lambda d: state(d) in ("done", "error"), args.timeout)
        if state(driver) != "done":
            raise SystemExit(f"the page shows an error: {driver.find_element('id', 'error').text}")
        screenshot(driver, args.out, max_height=args.height)
        print(f"answer: {driver.find_element('id', 'answer').text!r}")
        print(f"models: {driver.find_element('id', 'models').text}")
    print(f"wrote {args.out} (gateway log: {gateway.log_path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
