"""The per-round allocations of a run of the authors' code (haoran-zh/mmfl-Dec), as an mmfl
replay file (``sampler.replay_file``, mmfl.experiment.replay).

Their main.py / main2.py save ``allocation_dict_list_0.pkl`` in the run's result folder: a list
with one dict per round, client -> list of the models its processors trained (a model listed
twice is two processors training it). This writes the rounds asked for as JSON::

    .venv/bin/python scripts/authors_allocation.py RESULT_DIR/allocation_dict_list_0.pkl \\
        --rounds 1 --out docs/paper1_authors/federations/alloc_s1.json

The pickle is the authors' code's own output: read only files you made yourself (a pickle can
run code when loaded). Client and model numbers are theirs, which are mmfl's when the run used
their federation (``clients.federation_file`` exported from the same run).
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path


def allocation_rounds(rounds_of_dicts: list, wanted: list[int] | None) -> dict[str, list]:
    """{"r": [[client, task], ...]} for the 1-based rounds ``wanted`` (all when None); slots in
    client order, a client's models in the order listed."""
    out = {}
    for r, alloc in enumerate(rounds_of_dicts, start=1):
        if wanted is not None and r not in wanted:
            continue
        out[str(r)] = [[int(c), int(s)] for c in sorted(alloc) for s in alloc[c]]
    missing = sorted(set(wanted or ()) - {int(r) for r in out})
    if missing:
        raise SystemExit(f"the run has {len(rounds_of_dicts)} rounds; no round {missing[0]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pickle", type=Path, help="allocation_dict_list_0.pkl of one run")
    ap.add_argument("--rounds", default="", help="comma-separated 1-based rounds (default all)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    with open(args.pickle, "rb") as f:
        rounds_of_dicts = pickle.load(f)  # the user's own file, see the module doc
    wanted = [int(r) for r in args.rounds.split(",")] if args.rounds else None
    doc = {"rounds": allocation_rounds(rounds_of_dicts, wanted),
           "source": f"allocation_dict_list of {args.pickle.parent.name} (authors' code)"}
    args.out.write_text(json.dumps(doc) + "\n", encoding="utf-8")
    slots = {r: len(v) for r, v in doc["rounds"].items()}
    print(f"{args.out}: slots per round {slots}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
