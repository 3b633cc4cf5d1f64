import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvpager import cli


def test_bench_tables_prints_figures(capsys):
    code = cli.main(["bench", "tables", "--batch", "8", "--steps", "20", "--warmup", "5",
                     "--path", "events", "rebuild", "--churn", "0.2", "--max-len", "256"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line.split() for line in out.splitlines() if line.strip().startswith("8 ")]
    assert {line[1] for line in lines} == {"cold", "warm"}
    assert {line[-1] for line in lines} == {"events", "rebuild"}
    assert all(float(line[2]) > 0 for line in lines)


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "kvpager.cli", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for name in ("demo", "simulate", "bench"):
        assert name in result.stdout


def test_bench_tables_times_both_event_paths(capsys):
    from kvpager.block_table import NATIVE_AVAILABLE

    assert cli.main(["bench", "tables", "--batch", "16", "--steps", "20", "--warmup", "5"]) == 0
    paths = {line.split()[-1] for line in capsys.readouterr().out.splitlines()
             if line.strip().startswith("16 ")}
    assert paths == ({"rebuild", "events", "events-py"} if NATIVE_AVAILABLE else
                     {"rebuild", "events"})


def test_bench_scheduler_with_mtp_keeps_every_request_running(capsys):
    """512 requests, 1000-token prompts, 3 tokens a step: requests that finish prefill early
    decode while the rest prefill, and none may finish inside the timed steps."""
    assert cli.main(["bench", "scheduler", "--mtp", "2", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "s_q=3" in out and "schedule" in out


# --- user mistakes: `kvpager <command>: error: ...`, exit status 2, never a traceback ----------
# (the command line as docs/bad-inputs.md shows it, a regex the error line matches); {file} is
# an existing file, {missing} a path that does not exist, {bad_trace} a CSV without output_len,
# {bad_jsonl} a JSONL file whose second line is not JSON.
CLI_MISTAKES = [
    ("kvpager simulate --num-pages 0", r"argument --num-pages: 0 must be >= 1"),
    ("kvpager simulate --accept-rate 1.5", r"argument --accept-rate: 1.5 is not a probability"),
    ("kvpager simulate --sigma -1", r"argument --sigma: -1 must be >= 0"),
    ("kvpager simulate --mtp -1", r"argument --mtp: -1 must be >= 0"),
    ("kvpager simulate --mtp 20",
     r"--max-tokens=4096 cannot decode a full batch \(--max-batch-size=256 x s_q=21\)"),
    ("kvpager simulate --out {file}", r"argument --out: .* exists and is not a directory"),
    ("kvpager simulate --trace {missing}", r"argument --trace: .* does not exist"),
    ("kvpager simulate --trace {bad_trace}", r"trace .* lacks \['output_len'\]"),
    ("kvpager simulate --trace {bad_jsonl}", r"trace .*bad.jsonl cannot be read as JSONL"),
    ("kvpager simulate --arrivals bursty --burstiness 1e-300", r"burstiness=1e-300 must be in \[0.01, 100\]"),
    ("kvpager simulate --kv-memory-gb 0.00001", r"--kv-memory-gb 1e-05 holds no page"),
    ("kvpager simulate --rate nan", r"argument --rate: 'nan' is not a finite number"),
    ("kvpager simulate --requests x", r"argument --requests: 'x' is not an int"),
    ("kvpager simulate --prefix-caching --num-pages 10",
     r"prefix caching with 10 usable pages .* raise --num-pages .* at least 256, or lower "
     r"--max-model-len"),
    ("kvpager simulate --kv-cache-dtype int8", r"argument --kv-cache-dtype: invalid choice: 'int8'"),
    ("kvpager bench tables --churn 2", r"argument --churn: 2 is not a probability"),
    ("kvpager bench scheduler --batch 0", r"argument --batch: 0 must be >= 1"),
    ("kvpager bench kernel (no Hopper GPU)", r"(no CUDA device here|the kernel cannot run here)"),
    ("kvpager simulatte", r"argument command: invalid choice: 'simulatte'"),
]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """kvpager's exit status and stderr, whether argparse exits or main returns."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("line, match", CLI_MISTAKES, ids=[m[0] for m in CLI_MISTAKES])
def test_user_mistakes_get_one_error_line_and_status_2(line, match, tmp_path, capsys):
    existing = tmp_path / "existing.txt"
    existing.write_text("x")
    bad_trace = tmp_path / "bad.csv"
    bad_trace.write_text("arrival,prompt_len\n0,1\n")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"arrival": 0, "prompt_len": 3, "output_len": 2}\n{bad json\n')
    if "kernel" in line and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    argv = line.split(" (")[0].format(file=existing, missing=tmp_path / "nope.csv",
                                      bad_trace=bad_trace, bad_jsonl=bad_jsonl).split()[1:]
    code, err = run_cli(argv + (["--no-progress"] if argv[0] == "simulate" else []), capsys)
    command = " ".join(argv[:2]) if argv[0] == "bench" else argv[0]
    assert code == 2
    assert "Traceback" not in err
    assert re.search(rf"^kvpager( {command})?: error: .*{match}", err, re.M), err


def test_every_cli_mistake_is_in_the_docs_table():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md").read_text()
    missing = [line for line, _ in CLI_MISTAKES if f"| `{line}` |" not in doc]
    assert not missing, f"add these to docs/bad-inputs.md: {missing}"


def test_simulate_ends_cleanly_when_the_last_arrival_is_rejected(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival,prompt_len,output_len\n0.0,100,20\n0.1,100000,20\n")
    out = tmp_path / "out"
    assert cli.main(["simulate", "--trace", str(trace), "--no-progress", "--out", str(out)]) == 0
    doc = json.loads((out / "summary.json").read_text())
    assert doc["summary"]["requests_finished"] == 1 and doc["summary"]["requests_rejected"] == 1
    assert (out / "timeline.png").read_bytes()[:4] == b"\x89PNG"


def test_simulate_with_every_request_rejected_still_writes_outputs(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["simulate", "--requests", "20", "--num-pages", "1", "--no-progress",
                     "--out", str(out)]) == 0
    doc = json.loads((out / "summary.json").read_text())
    assert doc["summary"]["requests_rejected"] == 20 and doc["summary"]["steps"] == 0
    assert (out / "timeline.png").exists()


def test_help_does_not_import_torch_and_answers_fast():
    code = ("import sys\nfrom kvpager import cli\ntry:\n    cli.main(['--help'])\n"
            "except SystemExit:\n    pass\n"
            "print([m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("[]"), result.stdout + result.stderr
    seconds = []
    for _ in range(3):  # the best of three: another job on the machine can stall one run
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kvpager.cli", "--help"], capture_output=True,
                       timeout=60, check=True)
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 0.5, f"kvpager --help took {min(seconds):.2f} s"


def test_version_and_defaults_in_help(capsys):
    from kvpager import __version__

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"kvpager {__version__}"
    with pytest.raises(SystemExit):
        cli.main(["simulate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "synthetic requests (default: 10000)" in text and "(default: 0.7)" in text


def test_bench_tables_shows_a_progress_bar_on_stderr(capsys):
    args = ["bench", "tables", "--batch", "4", "--steps", "150", "--warmup", "0", "--path", "events"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "bench tables" in captured.err and "step" in captured.err
    assert "bench tables" not in captured.out  # the figures' table stays clean
    assert cli.main(args + ["--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_bench_prefix_prints_admission_figures(capsys):
    assert cli.main(["bench", "prefix", "--prompt-len", "1024", "--hit", "896", "900", "--iters",
                     "20", "--warmup", "2", "--siblings", "4", "--other-prompts", "2",
                     "--full-pool"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith(("896 ", "900 "))]
    assert {(r[0], r[2], r[3]) for r in rows} == {
        (hit, pool, part) for hit in ("896", "900") for pool in ("room", "full")
        for part in ("admission", "keys", "slots", "commit")}
    assert all(float(x) > 0 for r in rows for x in r[4:])
