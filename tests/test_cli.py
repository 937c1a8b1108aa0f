"""The command line as a user meets it: no environment changed at import, the real dispatch in
forecast, data handling (docs/spec.md §3), help text without markup, check's verdict, progress bars only
on a terminal. Timings are reported by the commands, never judged here."""
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO
from timellm_fast import cli, data, forecast, timing

ON_GPU = torch.cuda.is_available()
#: a user's shell: no interpreter, no data variable (each test adds what it needs)
USER_ENV = {k: v for k, v in os.environ.items()
            if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION", data.DATA_ENV, "PYTHONPATH")}
TINY_FORECAST = ["forecast", "--steps", "2", "--seq-len", "32", "--pred-len", "8", "--batch-size", "2",
                 "--eval-batches", "1", "--num-tokens", "50", "--llm-layers", "1", "--d-llm", "32"]


def _run(args, env, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def write_ett_csv(path: Path, rows: int = data.ETT_HOUR_ROWS_NEEDED) -> Path:
    """An ETT-shaped CSV (date + 7 columns) of the synthetic series."""
    values = data.synthetic_ett(rows=rows)
    lines = ["date,HUFL,HULL,MUFL,MULL,LUFL,LULL,OT"]
    lines += [f"2016-07-01 {i % 24:02d}:00:00," + ",".join(f"{v:.4f}" for v in row)
              for i, row in enumerate(values.tolist())]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_importing_the_cli_changes_no_environment():
    script = ("import os\n"
              "before = dict(os.environ)\n"
              "import timellm_fast.cli, timellm_fast.forecast, timellm_fast.data\n"
              "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
              "print('unchanged')\n")
    proc = _run(["-c", script], USER_ENV)
    assert proc.returncode == 0 and proc.stdout.strip() == "unchanged", proc.stderr[-3000:]


def test_interpreter_is_turned_on_in_exactly_two_places():
    """The test configuration, and the check command's child process; nothing a user imports or
    runs otherwise (forecast, bench, the benchmark suites) runs the kernels in the interpreter."""
    setting = re.compile(r"""environ\.setdefault\(\s*["']TRITON_INTERPRET|environ\[\s*["']TRITON_INTERPRET["']\s*\]\s*="""
                         r"""|TRITON_INTERPRET=["']1["']|export\s+TRITON_INTERPRET""")
    files = [p for p in REPO.rglob("*") if p.suffix in (".py", ".sh") or p.name == "run"]
    found = sorted(str(p.relative_to(REPO)) for p in files
                   if not any(part.startswith(".venv") or part == "build" for part in p.parts)
                   and p.is_file() and setting.search(p.read_text(errors="ignore")))
    assert found == ["tests/conftest.py", "timellm_fast/cli.py"], found


@pytest.mark.skipif(ON_GPU, reason="on a GPU the fast layers take their Triton kernels")
def test_forecast_on_a_cpu_runs_the_eager_path_and_says_the_data_is_synthetic():
    """Without CUDA and without the interpreter our layers take their eager path (the mechanism
    that makes the fast model no slower than eager on a CPU), and with no data asked for the run
    says, before and after its table, that the series is synthetic."""
    proc = _run(["-m", "timellm_fast", *TINY_FORECAST], USER_ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.splitlines()[0].startswith("NOTICE: synthetic series: no data was given")
    assert "(synthetic data: these MSE/MAE are not ETTh1's)" in out
    assert "fast layers run as: their eager path (no CUDA device" in out
    taken = next(line for line in out.splitlines() if line.startswith("paths taken by the fast layers:"))
    assert "patch_embedding eager" in taken and "reprogramming_attention eager" in taken and "triton" not in taken
    assert ": agree" in out
    assert "test MSE / MAE: over 2 windows of the test split" in out  # what the errors are measured on
    assert proc.stderr.strip() == "", proc.stderr[-3000:]  # no progress bar in captured output


@pytest.mark.parametrize("where", ["flag", "env"])
def test_forecast_with_a_data_path_that_does_not_exist_is_an_error_naming_it(tmp_path, where, capsys, monkeypatch):
    missing = tmp_path / "nowhere" / "ETTh1.csv"
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    if where == "env":
        monkeypatch.setenv(data.DATA_ENV, str(missing))
        argv = TINY_FORECAST
    else:
        argv = TINY_FORECAST + ["--data", str(missing)]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert str(missing) in captured.err and "does not exist" in captured.err
    assert "synthetic" not in captured.out + captured.err


def test_data_folder_without_the_csv_is_an_error_and_a_folder_with_it_is_read(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    with pytest.raises(data.DataNotFoundError, match="folder without ETTh1.csv"):
        data.load_ett_values(tmp_path)
    csv_path = write_ett_csv(tmp_path / "ETTh1.csv", rows=40)
    values, source = data.load_ett_values(tmp_path)
    assert values.shape == (40, 7) and source == str(csv_path)
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.load_ett_values(name="ETTh1")[1] == str(csv_path)
    with pytest.raises(data.DataNotFoundError, match="ETTh2.csv"):
        data.load_ett_values(name="ETTh2")
    monkeypatch.delenv(data.DATA_ENV)
    values, source = data.load_ett_values()
    assert values.shape == (17420, 7) and source.startswith("synthetic series")


def test_library_and_cli_never_point_at_the_development_data_folder():
    for path in sorted((REPO / "timellm_fast").glob("*.py")) + sorted((REPO / "kernels").glob("*.py")):
        assert "shared" + "/data" not in path.read_text() and "../shared" not in path.read_text(), path


def test_readme_serves_users():
    """README: short, no pointer to our own machines' folders or the internal contract, says where
    the ETT CSVs come from, gives the two commands CI and users run."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for internal in ("../shared", "shared/data", "SPEC"):
        assert internal not in text, internal
    assert "https://github.com/zhouhaoyi/ETDataset" in text and "dataset/" in text
    assert "python -m pytest tests -q -n auto" in text and "timellm-fast " in text
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    ci = (REPO / ".ci" / "run").read_text()
    assert "python -m pytest tests -q -n auto" in ci  # README's test command is what CI runs
    # ... which lists skip reasons and leaves the ahead-of-time sweep to a CI step of its own
    addopts = re.search(r'^addopts = "(.*)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert "-rs" in addopts.split() and "-m 'not aot_sweep'" in addopts
    sweep = "python -m pytest tests/test_aot.py -m aot_sweep"
    assert sweep in text and sweep in ci


def test_forecast_reads_the_csv_it_is_given(tmp_path, capsys):
    csv_path = write_ett_csv(tmp_path / "my-ETTh1.csv")
    assert cli.main(TINY_FORECAST + ["--data", str(csv_path)]) == 0
    out = capsys.readouterr().out
    assert f"data: {csv_path}" in out and "NOTICE" not in out and "synthetic" not in out


def _subparsers(parser):
    return {name: sub for action in parser._subparsers._group_actions for name, sub in action.choices.items()}


def test_help_texts_carry_no_markup():
    parser = cli.build_parser()
    texts = [parser.format_help()] + [sub.format_help() for sub in _subparsers(parser).values()]
    assert len(texts) == 5
    for text in texts:
        for markup in ("``", ":func:", ":class:", "**", "`"):
            assert markup not in text, (markup, text)
    proc = _run(["-m", "timellm_fast", "--help"], USER_ENV)
    assert proc.returncode == 0 and "check" in proc.stdout and "``" not in proc.stdout


def test_every_command_and_option_has_help():
    """Each subcommand's --help starts with a description of what it does, and every option says
    what it is (and what its default is where it has one)."""
    subparsers = _subparsers(cli.build_parser())
    assert sorted(subparsers) == ["all", "bench", "check", "forecast"]
    for name, sub in subparsers.items():
        assert sub.description and len(sub.description) > 40, name
        for action in sub._actions:
            assert action.help and len(action.help) > 15, (name, action.option_strings)
    for name in ("all", "check", "bench", "forecast"):
        assert "--data" in subparsers[name].format_help(), name


def test_check_and_all_take_data(tmp_path, monkeypatch, capsys):
    """check --data (and all --data) reads the CSV named; a path that is not there is an error
    before anything runs."""
    missing = tmp_path / "nowhere.csv"
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    ran = []
    monkeypatch.setattr(cli, "check_command", lambda data=None: ran.append(data) or True)
    monkeypatch.setattr(cli, "bench", lambda *args: ran.append(args) or 0)
    for command in ("check", "all"):
        assert cli.main([command, "--data", str(missing)]) == 2
        err = capsys.readouterr().err
        assert f"timellm-fast {command}: error" in err and str(missing) in err and "does not exist" in err
    assert ran == []
    csv_path = write_ett_csv(tmp_path / "ETTh1.csv", rows=40)
    assert cli.main(["check", "--data", str(tmp_path)]) == 0  # a folder holding ETTh1.csv
    assert ran == [str(csv_path)]
    assert cli.main(["all", "--data", str(csv_path)]) == 0
    assert ran[1] == str(csv_path) and ran[2][-1] == str(csv_path)  # check's and bench's data


def test_check_reads_its_series_from_the_data_given(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    csv_path = write_ett_csv(tmp_path / "mine.csv", rows=600)
    x, source = cli._series(14, 96, str(csv_path))
    assert source == str(csv_path) and x.shape == (14, 1, 96)
    _, fallback = cli._series(14, 96)
    assert fallback.startswith("synthetic series")


def test_bench_results_folders_are_never_overwritten(tmp_path):
    first = cli.new_results_dir(tmp_path, "local-cpu-2026-12-07")
    second = cli.new_results_dir(tmp_path, "local-cpu-2026-12-07")
    assert (first.name, second.name) == ("local-cpu-2026-12-07-run1", "local-cpu-2026-12-07-run2")
    (tmp_path / "local-cpu-2026-12-07-run7").mkdir()
    assert cli.new_results_dir(tmp_path, "local-cpu-2026-12-07").name == "local-cpu-2026-12-07-run8"
    (first / "results.json").write_text("{}")
    with pytest.raises(cli.ResultsFolderNotEmpty, match="never overwritten"):
        cli.bench(out=str(first))
    assert cli.main(["bench", "--out", str(first)]) == 2
    assert (first / "results.json").read_text() == "{}"


def test_forecast_says_what_its_errors_are_measured_on():
    note = forecast.what_the_errors_measure(8, "independent", 5, 96, 24)
    flat = " ".join(note.split())
    assert "over 8 windows of the test split" in flat and "standardized with the training split's mean and std" in flat
    assert "last training batch" in flat and "far above" in flat
    assert all(len(line) <= 100 for line in note.splitlines())


def _fake_check(results):
    """A check run that returns `results` (tensor name -> (error, oracle scale)) for every op and dtype."""
    def run(inputs, dtype):
        pairs = {}
        for name, (err, scale) in results.items():
            ref = torch.full((3,), float(scale), dtype=torch.float64)
            pairs[name] = (ref + err, ref)
        return "eager", pairs
    return run


def test_check_ends_with_a_verdict_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_check_patch_embedding", _fake_check({"y": (0.0, 1.0), "dW": (0.0, 1.0)}))
    monkeypatch.setattr(cli, "_check_reprogramming", _fake_check({"out": (0.0, 1.0), "dWq": (1e-6, 0.0)}))
    assert cli.check() is True
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "check: 12/12 within tolerance"
    # 3e-3 is outside the fp32 bar (1e-4 * 2) and fp16's (2^-10 * 2), inside bf16's (2^-7 * 2)
    monkeypatch.setattr(cli, "_check_reprogramming", _fake_check({"out": (0.0, 1.0), "dWq": (3e-3, 1.0)}))
    assert cli.check() is False
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last == "check: 10/12 within tolerance; outside it: reprogramming float32 dWq, reprogramming float16 dWq"


def test_check_command_exits_non_zero_when_an_op_is_outside_tolerance(monkeypatch, capsys):
    monkeypatch.setattr(cli, "check", lambda data=None: False)
    monkeypatch.setattr(cli, "DEVICE", torch.device("cuda"))  # in process, as on a GPU
    assert cli.main(["check"]) == 1
    assert "FAILED" in capsys.readouterr().err


@pytest.mark.skipif(ON_GPU, reason="on a GPU check runs the kernels natively, in process")
def test_check_on_a_cpu_runs_the_kernels_in_the_interpreter_and_says_so():
    """From a user's shell (no TRITON_INTERPRET): check re-runs itself with the interpreter on,
    its header says so, every row ran the Triton path, and it ends with the verdict."""
    proc = _run(["-m", "timellm_fast", "check"], USER_ENV, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "Triton's interpreter" in lines[0]
    header = next(line for line in lines if line.startswith("check: device cpu"))
    assert "ops run as: Triton kernels in Triton's interpreter" in header
    rows = [line.split() for line in lines if line.startswith(("patch_embedding ", "reprogramming "))]
    assert len(rows) == 24 and all(row[2] == "triton" for row in rows)
    assert lines[-1] == "check: 24/24 within tolerance"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_only_on_a_terminal():
    captured = io.StringIO()
    assert list(forecast.progress(range(3), 3, "train", stream=captured)) == [0, 1, 2]
    assert captured.getvalue() == ""
    terminal = _Terminal()
    assert list(forecast.progress(range(3), 3, "train", stream=terminal)) == [0, 1, 2]
    drawn = terminal.getvalue()
    assert "train" in drawn and not drawn.endswith("\n")  # cleared in place: the next line starts clean


def test_forecast_models_take_turns_and_alternate_who_goes_first():
    models = {"eager": "E", "fast": "F"}
    orders = [[label for label, _ in forecast._in_turn(models, i)] for i in range(4)]
    assert orders == [["eager", "fast"], ["fast", "eager"], ["eager", "fast"], ["fast", "eager"]]


def test_median_seconds_on_the_host_times_reps_calls_after_the_warm_up(monkeypatch):
    """The wall-clock path of the one timer (the CLI's, the suites' and the tuners'): warm-up calls
    untimed, then the median of `reps` timed calls (here of 1, 3 and 2 clock units)."""
    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    assert timing.median_seconds(lambda: calls.append(None), cuda=False, reps=3, warmup_calls=2) == 2.0
    assert len(calls) == 5
