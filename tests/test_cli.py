"""The ``vlinterpret`` command: bad input gives one line and a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr

from tests.test_schema import BAD_CASES, SPEC, _broken
from vlinterpret_panel.schema import records_to_dataset
from vlinterpret_panel.synth import synthetic_record


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlinterpret_panel.cli", *args], capture_output=True, text=True, timeout=120
    )


def _assert_one_clear_line(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in lines[0]


@pytest.fixture(scope="module")
def good_dataset() -> xr.Dataset:
    return records_to_dataset([synthetic_record(SPEC, i) for i in range(3)], SPEC.model_info())


@pytest.mark.parametrize("how", sorted(BAD_CASES))
def test_validate_reports_each_bad_case_in_one_line(tmp_path: Path, good_dataset: xr.Dataset, how: str) -> None:
    shard = tmp_path / "shard-bad.nc"
    _broken(good_dataset, how).to_netcdf(shard)
    result = run_cli("validate", str(shard))
    _assert_one_clear_line(result, BAD_CASES[how])
    assert str(shard) in result.stderr


def test_validate_reports_files_that_are_not_netcdf(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "shard-1.nc").write_text("hello")
    _assert_one_clear_line(run_cli("validate", str(store)), "not a readable netCDF file")
    _assert_one_clear_line(run_cli("validate", str(tmp_path / "nowhere")), "no such store")


def test_synth_then_validate(tmp_path: Path) -> None:
    store = tmp_path / "s"
    made = run_cli("synth", str(store), "--examples", "5", "--layers", "2", "--heads", "3", "--tokens", "24")
    assert made.returncode == 0, made.stderr
    checked = run_cli("validate", str(store))
    assert checked.returncode == 0, checked.stderr
    assert "valid (5 examples in 1 shard(s)" in checked.stdout
