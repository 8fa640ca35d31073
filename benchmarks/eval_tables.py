"""Print the README's quality tables from <dir>/eval_<set>_<preset>.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gainrag.evaluation.harness import PRESETS, format_table

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    """One markdown table per dev set, presets in a fixed order."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sets", nargs="+", default=["nq_dev", "squad_dev"])
    p.add_argument("--dir", type=Path, default=RESULTS, help="where the eval JSON files are")
    args = p.parse_args()
    order = ["closed-book", "retrieval", "rerank", "gainrag-no-pseudo", "gainrag"]
    assert set(order) == set(PRESETS)
    for name in args.sets:
        reports = []
        for preset in order:
            path = args.dir / f"eval_{name}_{preset}.json"
            if path.exists():
                reports.append(json.loads(path.read_text()))
        if reports:
            ks = sorted({r["settings"]["k"] for r in reports})
            ns = sorted({r["n"] for r in reports})
            print(f"**{name}** (n = {', '.join(map(str, ns))}, k = {', '.join(map(str, ks))}):\n")
            print(format_table(reports))
            print()


if __name__ == "__main__":
    main()
