"""``import fedcoe_edge as fe``: every public name resolves, and the import stays light."""

from __future__ import annotations

import subprocess
import sys

import fedcoe_edge as fe


def test_every_public_name_resolves():
    for name in fe.__all__:
        assert getattr(fe, name) is not None, name
    assert fe.make_strategy("fedcoe", fe.ModelConfig(), fe.TrainConfig()).name == "fedcoe"
    assert "fmnist" in fe.DATASETS


def test_unknown_name_is_an_attribute_error():
    try:
        fe.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


def test_import_does_not_pull_torch():
    """Nor does a config naming a built-in or a registered part: a device reading a bundle's
    manifest needs no torch (the built-ins are registered by import path)."""
    code = ("import sys, fedcoe_edge as fe; fe.MoESession; fe.register_trunk('mine', 'pkg.m:f'); "
            "fe.ModelConfig(trunk='mobilenet_v3_small', expert_kind='mlp'); "
            "fe.ModelConfig(trunk='mine', expert_kind='mlp'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_exporter_and_daemons_are_imported_from_their_layer():
    """They sit above the library (docs/design.md, "Layers"): ``fe.`` does not name them, and
    asking for one says where it lives instead of importing an upper layer."""
    import pytest

    for name, how in fe.ABOVE.items():
        assert name not in fe.__all__
        with pytest.raises(AttributeError, match=how):
            getattr(fe, name)
        module, attr = how.removeprefix("from ").split(" import ")
        assert getattr(__import__(module, fromlist=[attr]), attr) is not None
