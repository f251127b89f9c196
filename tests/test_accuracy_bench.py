"""The accuracy benchmark and its tuner: a tiny grid end to end, the goals verdicts, the
tuner's selection rule and cache resume (a second invocation runs nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import tune
from benchmarks.accuracy import Grid, goals, load_cache, main, run_key

TINY = ["--quick", "--settings", "fmnist-dir0.1,digits-dir0.1", "--algorithms",
        "fedcoe,local,fedavg", "--ablations", "fedcoe-full", "--no-progress", "--jobs", "2"]


@pytest.mark.slow  # the grid CLI end to end with 2 job processes, twice (resume): 18 s (make test-all)
def test_quick_grid_report_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "acc"
    assert main([*TINY, "--out", str(out)]) == 0
    doc = json.loads((out / "accuracy.json").read_text())
    assert set(doc["settings"]) == {"fmnist-dir0.1", "digits-dir0.1"}
    block = doc["settings"]["fmnist-dir0.1"]
    assert block["rounds"] == 2 and block["config"]["data_fraction"] == 0.02
    assert block["config"]["global_test_samples"] == 1000
    assert set(block["algorithms"]) == {"fedcoe", "local", "fedavg", "fedcoe-full"}
    # ablations run at fmnist-dir0.1 only
    assert "fedcoe-full" not in doc["settings"]["digits-dir0.1"]["algorithms"]
    m = block["algorithms"]["fedavg"]
    for key in ("global_acc", "global_acc_std", "personalized_acc", "personalized_acc_std",
                "cold_start_acc", "cold_start_acc_std", "bytes_up_per_client_round",
                "bytes_down_per_client_round", "wall_s"):
        assert key in m
    diag = block["diagnostics"]["fedcoe"]
    assert len(diag["expert_share"]) == 4 and isinstance(diag["distinct_expert_sets"], int)
    for key in ("gate_entropy", "personal_vs_global_path", "global_path_acc", "local_acc",
                "personal_acc"):
        assert isinstance(diag[key], float)
    assert block["macs"]["fedcoe"] > 0 and block["macs"]["baseline"] > 0
    assert block["algorithms"]["local"]["no_shared_model"] is True
    assert doc["meta"]["complete"] and doc["meta"]["runs_done"] == 7 and doc["meta"]["cpu_s"] > 0
    md = (out / "accuracy.md").read_text()
    assert "## fmnist-dir0.1" in md and "| local | n/a |" in md and "Ablations" in md
    assert "| global >= FedProx | **pending** |" in md  # fedprox did not run: never invented
    assert "MACs per input" in md and "Convergence" in md and "CPU time" in md
    for png in ("accuracy_fmnist-dir0.1.png", "accuracy_fmnist-dir0.1_routing.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    cache = out / "accuracy_cache_quick.jsonl"
    lines = cache.read_text().splitlines()
    assert len(lines) == 7
    # resume: a full cache runs nothing; a half-done one with a torn line runs only the rest
    capsys.readouterr()
    assert main([*TINY, "--out", str(out)]) == 0
    assert "7 cached" in capsys.readouterr().err and len(cache.read_text().splitlines()) == 7
    # the run left out is the cheapest one (digits, no shared model), so the resume re-runs
    # seconds of training, not a Fashion-MNIST run evaluated on its 10,000 test images
    cheap = next(i for i, line in enumerate(lines)
                 if json.loads(line)["key"].startswith("digits-dir0.1|local|"))
    kept = lines[:cheap] + lines[cheap + 1:]
    cache.write_text("\n".join(kept) + "\n{\"key\": \"torn")
    assert main([*TINY, "--out", str(out)]) == 0
    assert "6 cached" in capsys.readouterr().err
    assert len(load_cache(cache)) == 7  # the re-run record did not glue onto the torn line


def test_quick_global_test_is_a_stratified_slice() -> None:
    """``--quick`` scores on a slice of the global test set that keeps every class in
    proportion; the full grid (None) and a set no larger than the slice are left whole."""
    from benchmarks.accuracy import limit_global_test
    from fedcoe_edge.data import make_federation

    fed = make_federation("digits", "dirichlet", 3, 1, 0, 0.5, 20)
    n = len(fed.y_global_test)
    assert limit_global_test(fed, None, 0) is fed and limit_global_test(fed, n, 0) is fed
    cut = limit_global_test(fed, n // 3, 0)
    assert abs(len(cut.y_global_test) - n // 3) <= 10  # one rounding per class
    want = np.bincount(fed.y_global_test, minlength=10) / n
    got = np.bincount(cut.y_global_test, minlength=10) / len(cut.y_global_test)
    assert np.abs(got - want).max() < 0.02 and (got > 0).all()
    rows = {r.tobytes() for r in fed.x_global_test}
    assert all(r.tobytes() in rows for r in cut.x_global_test)  # a subset, not new images
    assert cut.clients is fed.clients  # the clients' data untouched


def test_bad_arguments_and_missing_tuning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--settings", "nope", "--untuned", "--out", str(tmp_path)]) == 2
    assert "unknown setting" in capsys.readouterr().err
    assert main(["--algorithms", "fedcoe,nope", "--untuned", "--out", str(tmp_path)]) == 2
    assert main(["--tuned", str(tmp_path / "none.json"), "--out", str(tmp_path)]) == 2
    assert "benchmarks.tune" in capsys.readouterr().err
    partial = tmp_path / "tuned.json"
    partial.write_text(json.dumps({"tuned": {"fmnist": {"fedavg": {"lr": 0.05}}}}))
    assert main(["--tuned", str(partial), "--settings", "fmnist-dir0.1", "--algorithms",
                 "fedavg,ditto", "--ablations", "", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ditto" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


def test_cache_keys_follow_tuned_knobs_and_split() -> None:
    import dataclasses

    a = Grid(settings=["digits-dir0.1"], algorithms=["fedavg"], ablations=[], seeds=[0],
             rounds=5, tuned={"digits": {"fedavg": {"lr": 0.05}, "fedcoe": {"rho": 1.0},
                                         "ditto": {"ditto_lambda": 0.1}}})
    b = dataclasses.replace(a, tuned={"digits": {"fedavg": {"lr": 0.05}, "fedcoe": {"rho": 0.25},
                                                 "ditto": {"ditto_lambda": 1.0}}})
    c = dataclasses.replace(a, split="val")
    s = "digits-dir0.1"
    assert run_key(a, s, "fedavg", 0) == run_key(b, s, "fedavg", 0)
    assert run_key(a, s, "fedcoe", 0) != run_key(b, s, "fedcoe", 0)
    assert run_key(a, s, "fedcoe-full", 0) != run_key(b, s, "fedcoe-full", 0)  # FedCoE's knobs
    assert run_key(a, s, "ditto", 0) != run_key(b, s, "ditto", 0)
    assert b.train_for(s, "ditto").extra["ditto_lambda"] == 1.0
    assert run_key(a, s, "fedavg", 0) != run_key(c, s, "fedavg", 0)
    assert run_key(a, s, "fedavg", 0) != run_key(a, s, "fedavg", 1)


def summary(g: float, p: float, c: float, up: float = 100.0, seeds: int = 3,
            shared: bool = True) -> dict[str, float | bool]:
    return {"global_acc": g, "personalized_acc": p, "cold_start_acc": c,
            "bytes_up_per_client_round": up, "seeds": float(seeds), "no_shared_model": not shared}


def test_goals_met_not_met_and_pending() -> None:
    base = ["fedavg", "fedprox", "local", "ditto"]
    algos = {
        "fedcoe": summary(0.80, 0.90, 0.75, up=50.0),
        "fedavg": summary(0.78, 0.78, 0.74),
        "fedprox": summary(0.79, 0.79, 0.76),
        "local": summary(0.10, 0.95, 0.10, up=0.0, shared=False),
        "ditto": summary(0.78, 0.88, 0.74),
    }
    diag = {"expert_share": [0.3, 0.3, 0.3, 0.1], "distinct_expert_sets": 2}
    rows = {g.goal: g for g in goals(algos, diag, 3, base, routing_goals=True)}
    assert rows["personalized >= best baseline"].status == "NOT met"  # local 0.95 > 0.90
    assert "-0.050" in rows["personalized >= best baseline"].detail
    assert rows["global >= FedAvg"].status == "met" and "+0.020" in rows["global >= FedAvg"].detail
    assert rows["global >= FedProx"].status == "met"
    cold = rows["cold start >= every baseline"]
    assert cold.status == "NOT met" and "fedprox" in cold.detail and "local excluded" in cold.detail
    assert rows["experts carrying >= 10% of routing >= 3"].status == "met"  # 0.1 counts
    assert rows["distinct expert sets >= 3"].status == "NOT met"
    assert rows["upload <= 60% of FedAvg's"].status == "met"
    # a missing baseline, or one with fewer seeds than the grid, leaves its goals pending
    partial = {k: v for k, v in algos.items() if k != "fedprox"}
    partial["fedavg"] = summary(0.78, 0.78, 0.74, seeds=1)
    rows = {g.goal: g for g in goals(partial, None, 3, base, routing_goals=True)}
    assert rows["global >= FedProx"].status == "pending"
    assert rows["global >= FedAvg"].status == "pending" and "provisional" in rows[
        "global >= FedAvg"].detail
    assert rows["distinct expert sets >= 3"].status == "pending"
    assert rows["upload <= 60% of FedAvg's"].status == "pending"
    assert all(g.status == "pending" for g in goals({}, None, 3, base))


def test_tuner_selection_rule() -> None:
    rows = [
        {"global_acc": 0.70, "personalized_acc": 0.90},  # score 0.80
        {"global_acc": 0.85, "personalized_acc": 0.80},  # score 0.825: the winner
        {"global_acc": 0.90, "personalized_acc": 0.70},  # score 0.80
        {"global_acc": 0.60, "personalized_acc": 0.95},  # score 0.775
    ]
    assert tune.select(rows) == 1
    assert tune.select(rows[:3]) is None  # a partial search picks nobody
    tie = [dict(rows[1]) for _ in range(4)]
    assert tune.select(tie) == 0  # ties go to the first configuration
    local = [{**r, "shares_model": False} for r in rows]
    assert tune.select(local) == 3  # no shared model: personalized alone
    assert all(len(v) == tune.BUDGET for v in tune.SEARCH.values())
    assert tune.SEARCH["ditto"][0].keys() == {"lr", "ditto_lambda"}
    jobs = tune.job_list(["fmnist", "digits"], tune.ALGORITHMS)
    assert {a for _, a, _ in jobs[-8:]} == {"fedcoe"}  # FedCoE last: its code may still change


def test_tuner_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--quick", "--datasets", "digits", "--algorithms", "local", "--out", str(tmp_path),
            "--no-progress", "--jobs", "1"]
    assert tune.main(args) == 0
    doc = json.loads((tmp_path / "tuned.json").read_text())
    assert set(doc["tuned"]["digits"]) == {"local"} and doc["meta"]["split"] == "val"
    assert sum(r["chosen"] for r in doc["scores"]["digits"]["local"]) == 1
    assert "**chosen**" in (tmp_path / "tuning.md").read_text()
    capsys.readouterr()
    assert tune.main(args) == 0
    assert "4 cached" in capsys.readouterr().err
    assert len((tmp_path / "tuning_cache_quick.jsonl").read_text().splitlines()) == 4


def test_upload_split_by_hand() -> None:
    from benchmarks.accuracy import upload_split

    key = "bytes_up_per_client_round"
    algos = {"fedcoe": {key: 5 * 1024.0}, "fedcoe-full": {key: 9 * 1024.0}, "fedavg": {key: 4 * 1024.0}}
    text = upload_split(algos, m=2, k=4, top_k=2)  # expert 2 KB, fixed 1 KB, path 5 KB = 125%
    assert text is not None
    assert "each global expert 2.0 KB" in text and "gate + shared expert 1.0 KB" in text
    assert "125% of the baseline" in text
    assert upload_split({"fedcoe": {key: 5.0}}, m=2, k=4, top_k=2) is None  # no full-exchange row
