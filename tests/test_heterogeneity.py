"""Heterogeneity figures on hand-made label distributions, and the CLI end to end."""

import json

import numpy as np
import pytest

from fedcoe_edge.cli import main
from fedcoe_edge.errors import DataError
from fedcoe_edge.heterogeneity import analyse, analyse_labels, label_counts, smoothed_kl


def test_identical_clients_give_zero():
    counts = np.tile([50, 30, 20, 0], (5, 1))
    r = analyse(counts)
    assert r["mean_tv"] == 0 and r["mean_js"] == 0 and r["mean_pairwise_js"] == 0
    assert r["mean_pairwise_tv"] == 0 and abs(r["mean_kl"]) < 1e-12
    assert r["recommendation"] == "fedavg"
    assert r["evidence"]["excess_js"] < 0 < r["evidence"]["iid_baseline_js"]


def test_disjoint_labels_give_the_maximum():
    counts = np.diag([40, 40, 40, 40]).astype(float)  # client i holds only class i
    r = analyse(counts)
    assert r["mean_pairwise_js"] == pytest.approx(1.0)
    assert r["mean_pairwise_tv"] == pytest.approx(1.0)
    assert r["mean_tv"] == pytest.approx(0.75)  # 0.5 * (|1 - 1/4| + 3/4)
    # JS distance (base 2) of a point mass to the uniform over 4: from the definition
    m = np.array([0.625, 0.125, 0.125, 0.125])
    p, q = np.array([1.0, 0, 0, 0]), np.full(4, 0.25)
    kl = lambda a, b: float(np.sum(a[a > 0] * np.log2(a[a > 0] / b[a > 0])))  # noqa: E731
    assert r["per_client"]["0"]["js"] == pytest.approx(np.sqrt(0.5 * kl(p, m) + 0.5 * kl(q, m)))
    assert np.isfinite(r["per_client"]["0"]["kl"]) and r["per_client"]["0"]["kl"] > 1.0
    assert r["recommendation"] == "dual-level-moe"
    assert r["evidence"]["threshold"] > 0 and "rule" in r["evidence"]


def test_figures_grow_with_skew():
    base = np.full((4, 5), 20.0)
    skew = base.copy()
    skew[0] = [96, 1, 1, 1, 1]
    assert analyse(skew)["mean_tv"] > analyse(base)["mean_tv"]
    assert analyse(skew)["per_client"]["0"]["tv"] > analyse(skew)["per_client"]["1"]["tv"]


def test_smoothed_kl_is_finite_on_empty_classes():
    assert np.isfinite(smoothed_kl(np.array([1.0, 0.0]), np.array([0.0, 1.0])))
    assert smoothed_kl(np.array([0.3, 0.7]), np.array([0.3, 0.7])) == pytest.approx(0.0)


def test_labels_and_bad_input():
    r = analyse_labels({"a": np.array([0, 0, 1]), "b": np.array([2, 2])}, num_classes=4)
    assert r["classes"] == 4 and set(r["per_client"]) == {"a", "b"}
    assert label_counts([np.array([0, 3])]).shape == (1, 4)
    with pytest.raises(DataError, match="row 1 has no samples"):
        analyse(np.array([[1, 2], [0, 0]]))
    with pytest.raises(DataError, match="non-negative"):
        analyse(np.array([[1, -2], [1, 1]]))
    with pytest.raises(DataError, match="classes >= 2"):
        analyse(np.ones((3, 1)))


def test_cli_writes_json_and_heatmap(tmp_path, capsys):
    out = tmp_path / "h.json"
    assert main(["heterogeneity", "--dataset", "digits", "--partition", "dirichlet", "--alpha", "0.1",
                 "--clients", "8", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    for key in ("mean_tv", "mean_pairwise_js", "per_client", "recommendation", "evidence"):
        assert key in doc
    assert len(doc["per_client"]) == 8 and doc["recommendation"] == "dual-level-moe"
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "recommend dual-level-moe" in capsys.readouterr().out
    iid = tmp_path / "iid.json"
    assert main(["heterogeneity", "--partition", "iid", "--clients", "8", "--json", str(iid)]) == 0
    assert json.loads(iid.read_text())["recommendation"] == "fedavg"


def test_cli_impossible_partition_names_the_numbers(tmp_path, capsys):
    code = main(["heterogeneity", "--clients", "500", "--json", str(tmp_path / "x.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot give 500 clients 20 samples" in err and len(err.strip().splitlines()) == 1
