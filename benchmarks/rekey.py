"""Re-key cached runs after a change that cannot alter them (docs/benchmarks.md, "Caches").

The grid and the tuner key each cached run on its configuration and the declared numerics
version (``fedcoe_edge.numerics.NUMERICS_VERSION``), so a bump re-runs every algorithm (hours
on a 2-core machine). When the change behind a bump provably leaves some algorithms' runs
unchanged (a FedCoE-only rule, a loader they do not use), this moves those entries to their
new keys instead::

    python -m benchmarks.rekey --before HEAD~1 --algorithms fedavg,fedprox

Keys at ``--before`` are computed in a temporary git worktree of that revision, in a fresh
interpreter (the imports must come from that tree), and matched to today's keys by job
(setting, algorithm, seed, knobs). Only entries of the named algorithms move; the others keep
their old keys and re-run. The caller vouches that the change cannot alter those runs. Do
not run it while a grid or tuner is appending to the caches: the file is replaced whole.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LONG_CACHE = RESULTS / "long60" / "accuracy_cache.jsonl"
CACHES = (RESULTS / "accuracy_cache.jsonl", RESULTS / "tuning_cache.jsonl", LONG_CACHE)
# The convergence grid (`make accuracy-long`, every seed it may hold): its runs are keyed
# like the main grid's, with its own rounds and settings in the fingerprint.
LONG_ARGS = ["--rounds", "60", "--seeds", "0,1,2", "--ablations", "",
             "--settings", "fmnist-dir0.1,fmnist-dir0.5,fmnist-shards2",
             "--algorithms", "fedcoe,fedavg,fedprox,local,fedavg-ft,ditto,fedrep,mixture"]

# Run in the interpreter of the tree whose keys we want: prints {job: key} as JSON.
_KEYS_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from benchmarks import accuracy as A, tune as T
out = {}
g = A.grid_from_args(A.parse_args([]))
for s, a, seed in g.jobs():
    out[json.dumps(["grid", s, a, seed])] = A.run_key(g, s, a, seed)
lg = A.grid_from_args(A.parse_args(json.loads(sys.argv[2])))
for s, a, seed in lg.jobs():
    out[json.dumps(["long", s, a, seed])] = A.run_key(lg, s, a, seed)
for d, a, i in T.job_list(list(T.TUNE_SETTINGS), list(T.SEARCH)):
    knobs = T.SEARCH[a][i]
    tg = T.tune_grid(d, a, knobs, False, T.DEFAULT_FRACTION, None)
    out[json.dumps(["tune", d, a, knobs], sort_keys=True)] = A.run_key(tg, T.TUNE_SETTINGS[d], a, T.TUNE_SEED)
print(json.dumps(out))
"""


def job_keys(tree: Path) -> dict[str, str]:
    """{job identity: cache key} for every grid and tuning job of the source tree ``tree``."""
    proc = subprocess.run([sys.executable, "-c", _KEYS_SCRIPT, str(tree), json.dumps(LONG_ARGS)],
                          cwd=tree,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"rekey: computing keys in {tree} failed: {tail[0]}")
    keys: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return keys


def key_map(before: dict[str, str], after: dict[str, str], algorithms: set[str]) -> dict[str, str]:
    """Old key -> new key for the jobs of ``algorithms`` present in both trees."""
    return {before[job]: after[job] for job in before
            if job in after and json.loads(job)[2] in algorithms and before[job] != after[job]}


def rekey_file(path: Path, mapping: dict[str, str]) -> tuple[int, int]:
    """Rewrite ``path`` with mapped keys (atomically); returns (moved, lines)."""
    if not path.is_file():
        return 0, 0
    lines = path.read_text().splitlines()
    out, moved = [], 0
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line: the caches skip it too
        if rec.get("key") in mapping:
            rec["key"] = mapping[rec["key"]]
            moved += 1
        out.append(json.dumps(rec))
    if not moved:
        return 0, len(lines)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(out) + ("\n" if out else ""))
    tmp.replace(path)
    return moved, len(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.rekey", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--before", required=True, help="git revision whose keys the caches hold")
    p.add_argument("--algorithms", required=True,
                   help="comma-separated algorithms whose runs the change cannot alter")
    args = p.parse_args(argv)
    algorithms = {a.strip() for a in args.algorithms.split(",") if a.strip()}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        add = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree),
                              args.before], capture_output=True, text=True, check=False)
        if add.returncode != 0:
            print(f"rekey: cannot check out {args.before!r}: {add.stderr.strip()}", file=sys.stderr)
            return 2
        try:
            before = job_keys(tree)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           capture_output=True, check=False)
    after = job_keys(ROOT)
    unknown = algorithms - {json.loads(j)[2] for j in after}
    if unknown:
        print(f"rekey: unknown algorithm(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    mapping = key_map(before, after, algorithms)
    for path in CACHES:
        moved, total = rekey_file(path, mapping)
        print(f"{path.relative_to(ROOT)}: {moved} of {total} entries re-keyed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
