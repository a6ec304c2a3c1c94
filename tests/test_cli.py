"""The ``vlinterpret`` command: bad input gives one line and a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import xarray as xr

from tests.test_schema import BAD_CASES, SPEC, _broken
from vlinterpret_panel.adapters.hf_common import ALLOW_DOWNLOAD_VARIABLE
from vlinterpret_panel.schema import records_to_dataset
from vlinterpret_panel.synth import synthetic_record

DEMO_STORE = Path(__file__).resolve().parents[1] / "datasets" / "single_stream"


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


def test_version_and_a_plain_top_help_line() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("vlinterpret-panel ")
    top = run_cli("--help").stdout
    assert "``" not in top and "Extract, analyse and explore" in top


def test_every_option_says_what_it_does() -> None:
    from vlinterpret_panel.cli import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command")
    for name, subparser in commands.choices.items():
        for action in subparser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"vlinterpret {name} {action.option_strings[0]} has no help text"


def test_scenes_default_to_held_out_seeds() -> None:
    from vlinterpret_panel.cli import build_parser
    from vlinterpret_panel.extract import scene_sources
    from vlinterpret_panel.models.world import HELDOUT_SEED_START

    args = build_parser().parse_args(["extract", "single_stream", "store", "--scenes", "2"])
    assert [source.seed for source in scene_sources(2, seed=args.seed)] == [HELDOUT_SEED_START, HELDOUT_SEED_START + 1]
    assert scene_sources(1)[0].seed == HELDOUT_SEED_START
    assert f"default {HELDOUT_SEED_START:,}" in run_cli("extract", "--help").stdout


def test_help_and_version_do_not_load_torch() -> None:
    # --help and --version answer in about a second; the models package would add torch's 2 s.
    code = "import sys; from vlinterpret_panel.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_serve_on_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", str(DEMO_STORE), "--port", str(port))
    _assert_one_clear_line(result, "choose another port with --port")


def test_serve_on_a_port_taken_after_the_check_is_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import vlinterpret_panel.ui.serve as serving
    from vlinterpret_panel.errors import VLIError

    monkeypatch.setattr(serving, "check_port_free", lambda address, port: None)  # as if taken in between
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(VLIError, match=f"cannot listen on 127.0.0.1:{port} .*choose another port with --port"):
            serving.serve(DEMO_STORE, port=port)


def test_an_unknown_model_fails_at_once_offline_first(tmp_path: Path) -> None:
    import os
    import time

    cache = tmp_path / "hub-cache"
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", ALLOW_DOWNLOAD_VARIABLE)}
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlinterpret_panel.cli",
            "extract",
            "no_such_model",
            str(tmp_path / "s"),
            "--scenes",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "HF_HUB_CACHE": str(cache)},
    )
    _assert_one_clear_line(result, f"not a local directory nor in the Hugging Face cache ({cache})")
    assert "is no built-in model (" in result.stderr
    assert "pass --allow-download" in result.stderr and "Retrying" not in result.stderr
    assert time.monotonic() - started < 20  # imports only: 4-8 s on 2 busy cores; the Hub's retries took 28 s
