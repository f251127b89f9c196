"""Does a private copy of the held global path make FedCoE's personal model better?

FedCoE's personal prediction is the freshly aggregated global path over the device's held
experts plus its local residual (docs/design.md, "Local level: what the demo's accuracies
compare"): the residual was trained against the device's own copy of the global path, then
applied to the averaged one. The alternative measured here keeps, as part of the device's
private state, the copy of the held global path (gate, shared expert, held experts) it
trained this round, pulled toward the received copy by ``train.mu`` as every FedCoE round
already is, and predicts with that copy plus the local level (Ditto's idea on FedCoE's
held path). It costs no byte and no extra training: the copy is what local training left.

Both variants run on the same federations, seeds and knobs (the demo's setting by default:
digits, Dir(0.5), 6 training clients + 1 new, 10 rounds); the global model and every
upload are identical between them (the copy is never uploaded and is overwritten by the
received parameters before each round's training), so only personal accuracy can differ.
Writes ``--json`` and ``--md``; the variant is registered in this process only.

    PYTHONPATH=$PWD python -m benchmarks.private_path --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fedcoe_edge.simulation import SimulationConfig, simulate
from fedcoe_edge.strategies import register_strategy
from fedcoe_edge.strategies.base import Arrays, ClientData, ClientResult, ClientTask
from fedcoe_edge.strategies.fedcoe import FedCoE

VARIANT = "fedcoe-private"


class FedCoEPrivatePath(FedCoE):
    """FedCoE whose personal model keeps the device's trained copy of its held global path.

    The copy lives in the local state under the global names, so every place that loads
    the global state and then the local state (``predict_personal``, ``level_outputs``,
    ``predict_held``, a device's bundle) predicts with it; training drops it first, so each
    round trains from the received parameters exactly as FedCoE does."""

    name = VARIANT

    def client_update(self, task: ClientTask, local_state: Arrays | None,
                      data: ClientData) -> tuple[ClientResult, Arrays]:
        own = None if local_state is None else {
            n: v for n, v in local_state.items() if n not in task.params}
        result, local = super().client_update(task, own, data)
        return result, {**local, **{n: np.array(v) for n, v in result.params.items()}}


def run(seeds: list[int], rounds: int, clients: int, alpha: float) -> dict[str, Any]:
    register_strategy(VARIANT, FedCoEPrivatePath, replace=True)
    cfg = SimulationConfig(dataset="digits", alpha=alpha, clients=clients, new_clients=1,
                           rounds=rounds, algorithms=["fedcoe", VARIANT], seeds=seeds,
                           eval_every=rounds)
    _, runs = simulate(cfg, progress=True)
    per_seed: dict[str, list[dict[str, float]]] = {}
    for algorithm, rs in runs.items():
        per_seed[algorithm] = [{
            "seed": r.seed,
            "personalized_acc": r.metrics["personalized_acc"],
            "global_acc": r.metrics["global_acc"],
            "global_path_acc": float(r.diagnostics.get("global_path_acc", float("nan"))),
            "local_acc": float(r.diagnostics.get("local_acc", float("nan"))),
        } for r in rs]
    return {"setting": {"dataset": "digits", "partition": "dirichlet", "alpha": alpha,
                        "clients": clients, "new_clients": 1, "rounds": rounds, "seeds": seeds},
            "runs": per_seed,
            "host": {"python": platform.python_version(), "machine": platform.machine()}}


def markdown(doc: dict[str, Any]) -> str:
    s = doc["setting"]
    base, var = doc["runs"]["fedcoe"], doc["runs"][VARIANT]

    def mean_sd(rows: list[dict[str, float]], key: str) -> str:
        vals = [r[key] for r in rows]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.fmean(vals):.4f} ± {sd:.4f}"

    diff = [v["personalized_acc"] - b["personalized_acc"] for b, v in zip(base, var, strict=True)]
    lines = [
        "# Private copy of the held global path (benchmarks/private_path.py)",
        "",
        f"digits, Dir({s['alpha']}), {s['clients']} clients + {s['new_clients']} new, "
        f"{s['rounds']} rounds, seeds {', '.join(map(str, s['seeds']))}; the same federations "
        "and knobs for both; personal accuracy on the clients' own test splits.",
        "",
        f"**Personal accuracy, private copy minus FedCoE: {statistics.fmean(diff):+.4f} "
        f"(per seed {', '.join(f'{d:+.4f}' for d in diff)}).** "
        + ("The private copy is better on average." if statistics.fmean(diff) > 0 else
           "The private copy is NOT better: FedCoE keeps the aggregated global path."),
        "",
        "| variant | personalized | global (held-out set) | global path alone | local experts alone |",
        "|---|---|---|---|---|",
    ]
    for name, rows in (("fedcoe (aggregated held path + local)", base),
                       ("private copy of the held path + local", var)):
        lines.append(f"| {name} | {mean_sd(rows, 'personalized_acc')} | {mean_sd(rows, 'global_acc')} "
                     f"| {mean_sd(rows, 'global_path_acc')} | {mean_sd(rows, 'local_acc')} |")
    lines += ["", "| seed | fedcoe personalized | private copy personalized |", "|---|---|---|"]
    lines += [f"| {b['seed']} | {b['personalized_acc']:.4f} | {v['personalized_acc']:.4f} |"
              for b, v in zip(base, var, strict=True)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.private_path", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--rounds", type=int, default=10, help="the demo's rounds")
    p.add_argument("--clients", type=int, default=6, help="the demo's training devices")
    p.add_argument("--alpha", type=float, default=0.5, help="the demo's label skew")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/private_path.json"))
    p.add_argument("--md", type=Path, default=Path("benchmarks/results/private_path.md"))
    a = p.parse_args(argv)
    doc = run(a.seeds, a.rounds, a.clients, a.alpha)
    a.json.write_text(json.dumps(doc, indent=1) + "\n")
    a.md.write_text(markdown(doc))
    sys.stdout.write(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
