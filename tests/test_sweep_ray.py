"""``nosasim sweep --ray``: the grid as Ray tasks on a local cluster the sweep starts, the same CSV byte for byte as
the local run; without the extra, one line before any work."""

from __future__ import annotations

import sys

import pytest

from nosasim.cli import main

GRID = ["--batch", "8,16", "--capacity", "63,96", "--policy", "prev,lru", "--variant", "nosa,infllmv2", "--quiet"]


def test_ray_sweep_writes_the_local_csv(tmp_path):
    pytest.importorskip("ray")
    assert main(["sweep", *GRID, "--workers", "1", "--out", str(tmp_path / "local")]) == 0
    assert main(["sweep", *GRID, "--ray", "--out", str(tmp_path / "ray")]) == 0
    local = (tmp_path / "local" / "points.csv").read_bytes()
    assert local.count(b"\n") == 1 + 2 * 2 * 2 * 2  # every point of the grid, in both
    assert (tmp_path / "ray" / "points.csv").read_bytes() == local
    assert (tmp_path / "ray" / "pareto.csv").read_bytes() == (tmp_path / "local" / "pareto.csv").read_bytes()


def test_ray_sweep_without_the_extra_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(["sweep", *GRID, "--ray", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'nosasim[ray]'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused_before_the_work(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["sweep", *GRID, "--out", str(f)]) == 2
    captured = capsys.readouterr()
    assert "exists and is not a folder" in captured.err and "point" not in captured.out


@pytest.mark.parametrize("address, message", [("127.0.0.1:1", "nothing answers at '127.0.0.1:1'"),
                                              ("nohost", "expected 'auto', HOST:PORT")])
def test_ray_address_nobody_answers_is_one_line(tmp_path, capsys, address, message):
    """An address without a cluster is refused in one line at once (Ray would retry it for minutes)."""
    pytest.importorskip("ray")
    assert main(["sweep", *GRID, "--ray", address, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
