"""The README's usage example runs as written (CPU, reference MLA)."""
import re
from pathlib import Path


def test_readme_usage_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Using the pager\n\n```python\n(.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].shape == (2, 1, 16, 512) and scope["lse"].shape == (2, 16, 1)
    assert not scope["out"].isnan().any()
    assert scope["cache_seqlens"].tolist() == [100, 101]


def test_readme_async_engine_example_runs(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Serving: AsyncEngine.*?```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].endswith("length")  # the last chunk carries the finish reason
    assert sum(len(eval(line.rsplit(")", 1)[0] + ")")) for line in lines) == 8


def test_readme_prefix_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Reusing prompt prefixes\n\n```python\n(.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["copies"] == [(scope["hit"].partial_page, scope["seq2"].pages[1])]
    assert scope["seq2"].num_tokens == 120


def test_readme_generate_example_runs(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Continuous batching and simulation.*?```python\n(.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    out = scope["out"]
    assert len(out.token_ids) == 8 == len(out.logprobs) and out.finish_reason == "length"
    assert len(out.top_logprobs[0]) == 2 and out.logprobs[0] <= 0
