"""docs/api.md lists every public name, and its example runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import fedcoe_edge as fe
from fedcoe_edge.registry import TRUNKS

ROOT = Path(__file__).resolve().parents[1]
API = (ROOT / "docs" / "api.md").read_text()


def test_every_public_name_is_documented() -> None:
    documented = set(re.findall(r"`([A-Za-z_][A-Za-z_0-9]*)", API))
    missing = sorted(set(fe.__all__) - documented)
    assert not missing, f"docs/api.md does not list {missing}"


def test_api_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = re.findall(r"```python\n(.*?)```", API, flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    try:
        exec(compile(code, "docs/api.md", "exec"), scope)  # noqa: S102 - our own document
    finally:
        if "tiny" in TRUNKS:
            TRUNKS.unregister("tiny")
    probs = scope["probs"]
    assert probs.shape == (4, 10)  # type: ignore[attr-defined]
    assert os.path.isfile(tmp_path / "bundle" / "manifest.json")


def test_own_strategy_example_streams_and_shards(capsys: pytest.CaptureFixture[str]) -> None:
    """The user-defined strategy of docs/api.md, "Your own algorithm": registered, simulated
    (batch), folded into two shard partials that cross the wire form, merged, finalized."""
    from fedcoe_edge.strategies import unregister_strategy

    code = re.findall(r"```python\n(.*?)```", API, flags=re.S)[1]
    scope: dict[str, object] = {}
    try:
        exec(compile(code, "docs/api.md", "exec"), scope)  # noqa: S102 - our own document
    finally:
        unregister_strategy("clipped-fedavg")
    assert capsys.readouterr().out.strip() == "['d0', 'd2', 'd1'] [2.]"
    assert scope["doc"]["algorithms"]["clipped-fedavg"]  # type: ignore[index]
