"""Smoke test of the accuracy benchmark: a tiny grid, its report, and resuming from the cache."""

import json

import pytest

from benchmarks.accuracy import load_cache, main

TINY = ["--quick", "--settings", "digits-dir0.5,synthetic(1,1)", "--algorithms", "fedcoe,local,fedavg",
        "--ablations", "fedcoe-full", "--expert-kind", "mlp"]


def test_tiny_grid_report_and_resume(tmp_path, capsys):
    out = tmp_path / "acc"
    assert main([*TINY, "--out", str(out)]) == 0
    doc = json.loads((out / "accuracy.json").read_text())
    assert set(doc["settings"]) == {"digits-dir0.5", "synthetic(1,1)"}
    block = doc["settings"]["synthetic(1,1)"]
    assert block["config"]["partition"] == "natural"
    assert set(block["algorithms"]) == {"fedcoe", "local", "fedavg", "fedcoe-full"}
    m = block["algorithms"]["fedavg"]
    for key in ("global_acc", "global_acc_std", "personalized_acc", "personalized_acc_std",
                "cold_start_acc", "cold_start_acc_std", "bytes_up_per_client_round",
                "bytes_down_per_client_round", "wall_s"):
        assert key in m
    assert block["algorithms"]["local"]["no_shared_model"] is True
    assert doc["meta"]["complete"] and doc["meta"]["runs_done"] == 8
    md = (out / "accuracy.md").read_text()
    assert "## digits-dir0.5" in md and "| local | n/a |" in md and "Ablations" in md
    assert "cold start: FedCoE" in md
    assert (out / "accuracy_synthetic_1_1.png").read_bytes()[:4] == b"\x89PNG"
    cache = out / "accuracy_cache_quick.jsonl"
    lines = cache.read_text().splitlines()
    assert len(lines) == 8
    # a half-done grid: drop two runs and a torn line; only the missing runs run again
    cache.write_text("\n".join(lines[:6]) + "\n{\"key\": \"torn")
    capsys.readouterr()
    assert main([*TINY, "--out", str(out)]) == 0
    assert "6 cached" in capsys.readouterr().err
    assert json.loads((out / "accuracy.json").read_text())["meta"]["runs_done"] == 8
    assert len(load_cache(cache)) == 8  # the re-run records did not glue onto the torn line


def test_bad_arguments(tmp_path, capsys):
    assert main(["--settings", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown setting" in capsys.readouterr().err
    assert main(["--algorithms", "fedcoe,nope", "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


def test_cache_keys_follow_what_a_run_depends_on():
    import dataclasses

    from benchmarks.accuracy import Grid, run_key

    a = Grid(settings=["digits-dir0.5"], algorithms=["fedavg"], ablations=[], seeds=[0], rounds=5)
    b = dataclasses.replace(a, train=dataclasses.replace(a.train, beta=a.train.beta + 1))
    c = dataclasses.replace(a, train=dataclasses.replace(a.train, lr=a.train.lr * 2))
    assert run_key(a, "digits-dir0.5", "fedavg", 0) == run_key(b, "digits-dir0.5", "fedavg", 0)
    assert run_key(a, "digits-dir0.5", "fedcoe", 0) != run_key(b, "digits-dir0.5", "fedcoe", 0)
    assert run_key(a, "digits-dir0.5", "fedcoe-full", 0) != run_key(b, "digits-dir0.5", "fedcoe-full", 0)
    assert run_key(a, "digits-dir0.5", "fedavg", 0) != run_key(c, "digits-dir0.5", "fedavg", 0)
    assert run_key(a, "digits-dir0.5", "fedavg", 0) != run_key(a, "digits-dir0.5", "fedavg", 1)


def test_report_only_with_nothing_cached_keeps_the_old_report(tmp_path, capsys):
    out = tmp_path / "acc"
    out.mkdir()
    (out / "accuracy.md").write_text("old results")
    assert main([*TINY, "--report-only", "--out", str(out)]) == 2
    assert (out / "accuracy.md").read_text() == "old results"
    assert "none of the" in capsys.readouterr().err
