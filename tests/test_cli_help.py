"""Help and output a person can act on: ``--version``, the subcommand's usage on a bad flag,
defaults printed as the option takes them, choices listed, and ``predict`` that names
classes and says what ``--input`` must hold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedcoe_edge.cli import _subparsers, build_parser, main

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("fedcoe ")


def test_unknown_flag_prints_the_subcommands_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--rounds", "2", "--bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fedcoe simulate") and "unrecognized arguments: --bogus" in err


def test_every_help_prints_real_defaults() -> None:
    for name, parser in _subparsers(build_parser()).items():
        text = parser.format_help()
        assert "(default: None)" not in text and "default: ['" not in text, name
        assert "(default: False)" not in text, name
        assert text.count("(default:") <= len(parser._actions), name
        for action in parser._actions:  # every option says what it does
            assert not action.option_strings or action.help, (name, action.option_strings)


def test_simulate_help_lists_choices() -> None:
    from fedcoe_edge.commands.simulate import ALGORITHMS
    from fedcoe_edge.data.partition import PARTITIONERS
    from fedcoe_edge.strategies import STRATEGIES

    assert sorted(ALGORITHMS) == sorted(STRATEGIES)
    text = " ".join(_subparsers(build_parser())["simulate"].format_help().split())
    for word in ("folder:PATH", "cifar10:PATH", "fmnist", "default: fedcoe,fedavg", *ALGORITHMS):
        assert word in text, word
    for partition in PARTITIONERS:
        assert partition in text, partition


def test_predict_help_says_shape_dtype_and_scaling() -> None:
    text = " ".join(_subparsers(build_parser())["predict"].format_help().split())
    assert "float" in text and "[0, 1]" in text and "input_shape" in text and "not an image file" in text


@pytest.fixture(scope="module")
def named_bundle(digits_moe, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.bundle import build_bundle, calibration_sample

    out = tmp_path_factory.mktemp("named") / "bundle"
    build_bundle(digits_moe[0], out, calibration=calibration_sample(digits_moe[1], 64),
                 include_fp32=False, include_fused=False, meta={"classes": NAMES})
    return out


def test_predict_prints_class_names(named_bundle: Path, digits_moe, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from fedcoe_edge.runtime import MoESession

    x, y = digits_moe[3][:5], digits_moe[4][:5]
    np.save(tmp_path / "x.npy", x)
    assert main(["predict", "--bundle", str(named_bundle), "--input", str(tmp_path / "x.npy")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    probs = MoESession(named_bundle).predict(x)
    assert [ln.split("\t")[1] for ln in lines] == [NAMES[int(c)] for c in probs.argmax(1)]
    assert (probs.argmax(1) == y).mean() >= 0.6  # a real classifier, so names are meaningful
    assert main(["predict", "--bundle", str(named_bundle), "--input", str(tmp_path / "x.npy"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["class_names"] == [NAMES[c] for c in doc["classes"]]


def test_predict_bad_input_says_what_is_expected(named_bundle: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3, 8, 8), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((2, 1, 8, 8), np.uint8))
    for name in ("x.png", "wrong.npy", "ints.npy"):
        assert main(["predict", "--bundle", str(named_bundle), "--input", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "shape (N, 1, 8, 8)" in err[0] and "float32" in err[0], err
        assert "[0, 1]" in err[0]
