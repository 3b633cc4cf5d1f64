import subprocess
import sys

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
