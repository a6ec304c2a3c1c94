"""``vlinterpret stats`` on a Dask distributed cluster of processes gives exactly the one-process results."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from vlinterpret_panel import open_dataset
from vlinterpret_panel.cli import main
from vlinterpret_panel.cluster import distributed_client
from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.neighbors import layer_copy_exists, read_layer
from vlinterpret_panel.projection import project_hidden_states
from vlinterpret_panel.stats import cached_head_statistics


def _results(store: Path) -> tuple[dict, list, list]:
    """What ``stats`` cached: the statistics, each layer's projection, and each layer's search copy."""
    ds = open_dataset(store)
    table = cached_head_statistics(ds)
    assert table is not None
    layers = range(ds.sizes["hidden_layer"])
    projections = [project_hidden_states(ds, layer) for layer in layers]  # read from the cache
    assert all(layer_copy_exists(ds, layer) for layer in layers)
    copies = [read_layer(ds, layer) for layer in layers]
    return {name: table[name].values for name in table.data_vars}, projections, copies


def test_stats_on_a_local_cluster_of_processes_equals_one_process(
    small_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    alone, clustered = tmp_path / "alone", tmp_path / "clustered"
    for copy in (alone, clustered):
        shutil.copytree(small_store, copy, ignore=shutil.ignore_patterns(".cache"))
    assert main(["stats", str(alone), "--search-index", "--quiet"]) == 0
    assert main(["stats", str(clustered), "--search-index", "--quiet", "--workers", "2"]) == 0
    assert "computing on 2 Dask workers" in capsys.readouterr().out
    (stats_alone, points_alone, copies_alone), (stats_cluster, points_cluster, copies_cluster) = (
        _results(alone),
        _results(clustered),
    )
    assert stats_alone.keys() == stats_cluster.keys()
    for name, values in stats_alone.items():
        np.testing.assert_array_equal(values, stats_cluster[name], err_msg=name)
    for one, other in zip(points_alone, points_cluster, strict=True):
        np.testing.assert_array_equal(one.x.values, other.x.values)
        np.testing.assert_array_equal(one.y.values, other.y.values)
    for one, other in zip(copies_alone, copies_cluster, strict=True):
        np.testing.assert_array_equal(one, other)


def test_the_cluster_runs_in_worker_processes(small_store: Path) -> None:
    import os

    with distributed_client(small_store, workers=2) as client:
        assert client is not None
        pids = set(client.run(os.getpid).values())
    assert len(pids) == 2 and os.getpid() not in pids


def test_cluster_options_fail_with_a_clear_message(small_store: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["stats", str(small_store), "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["stats", str(small_store), "--workers", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    unreachable = pytest.raises(VLIError, match=re.escape("cannot reach the Dask scheduler at 'tcp://127.0.0.1:1'"))
    with unreachable, distributed_client(small_store, scheduler="tcp://127.0.0.1:1", timeout=2):
        pass


def test_workers_that_cannot_see_the_store_are_named(tmp_path: Path) -> None:
    with (
        pytest.raises(VLIError, match="2 of 2 Dask workers cannot see"),
        distributed_client(tmp_path / "nowhere", workers=2),
    ):
        pass
