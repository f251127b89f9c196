"""The `fedcoe` CLI: a real (tiny) simulation end to end, and clear errors on bad input."""

import json

import pytest

from fedcoe_edge.cli import main


def test_simulate_writes_all_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["simulate", "--rounds", "2", "--clients", "4", "--new-clients", "1", "--seeds", "0,1",
               "--local-epochs", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    for algo in ("fedcoe", "fedavg"):
        m = doc["algorithms"][algo]
        for key in ("global_acc", "global_acc_std", "personalized_acc", "personalized_acc_std",
                    "cold_start_acc", "cold_start_acc_std", "bytes_up_per_client_round",
                    "bytes_down_per_client_round", "wall_s"):
            assert isinstance(m[key], float), key
        assert 0.0 <= m["global_acc"] <= 1.0
        assert m["bytes_up_per_client_round"] > 1000
    assert (out / "report.md").read_text().count("| fedcoe |") == 2  # results and diagnostics rows
    assert (out / "routing_fedcoe.png").stat().st_size > 1000
    assert "expert_share" in json.loads((out / "results.json").read_text())["diagnostics"]["fedcoe"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoints" / "fedcoe" / "client_0.safetensors").is_file()
    assert "| fedavg |" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--dataset", "nope"], "unknown dataset"),
    (["--algorithms", "fedcoe,magic"], "unknown algorithm"),
    (["--alpha", "0"], "alpha must be > 0"),
    (["--alpha", "-1"], "alpha must be > 0"),
    (["--clients", "500"], "cannot give 504 clients"),
])
def test_simulate_bad_input(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    rc = main(["simulate", "--rounds", "1", "--no-progress", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_simulate_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    assert main(["simulate", "--out", str(target)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_bad_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nlr = -1\n")
    assert main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_simulate_vector_data_gets_mlp_experts(tmp_path):
    out = tmp_path / "syn"
    rc = main(["simulate", "--dataset", "synthetic", "--partition", "natural", "--clients", "4",
               "--new-clients", "1", "--rounds", "1", "--local-epochs", "1", "--algorithms", "fedcoe",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["model"]["expert_kind"] == "mlp"
    assert doc["config"]["model"]["input_shape"] == [60]
