import subprocess
import sys

from kvpager import cli


def test_bench_tables_prints_figures(capsys):
    code = cli.main(["bench", "tables", "--batch", "8", "--steps", "20", "--warmup", "5",
                     "--order", "stable", "--churn", "0.2", "--max-len", "256"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line.split() for line in out.splitlines() if line.strip().startswith("8 ")]
    assert {line[2] for line in lines} == {"cold", "warm"}
    assert all(float(line[3]) > 0 for line in lines)


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "kvpager.cli", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for name in ("demo", "simulate", "bench"):
        assert name in result.stdout
