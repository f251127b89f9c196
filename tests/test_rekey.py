"""benchmarks.rekey: only the named algorithms' entries move, torn lines are dropped."""

import json
from pathlib import Path

from benchmarks.rekey import key_map, rekey_file


def test_key_map_moves_only_named_algorithms() -> None:
    job = lambda a: json.dumps(["grid", "fmnist-dir0.1", a, 0])  # noqa: E731
    before = {job("fedavg"): "k1", job("fedcoe"): "k2", job("local"): "k3"}
    after = {job("fedavg"): "n1", job("fedcoe"): "n2", job("local"): "k3"}
    assert key_map(before, after, {"fedavg", "local"}) == {"k1": "n1"}  # local did not change


def test_rekey_file_rewrites_keys_and_skips_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps({"key": "k1", "v": 1}) + "\n" + json.dumps({"key": "k2", "v": 2})
                    + "\n" + '{"key": "k3", "v"')
    assert rekey_file(path, {"k1": "n1"}) == (1, 3)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert recs == [{"key": "n1", "v": 1}, {"key": "k2", "v": 2}]
    assert rekey_file(tmp_path / "missing.jsonl", {"k1": "n1"}) == (0, 0)
    before = path.stat().st_mtime_ns
    assert rekey_file(path, {"zz": "n9"}) == (0, 2)  # nothing to move: the file is not touched
    assert path.stat().st_mtime_ns == before
