"""The copy-task model (examples/deepseek/trained.py): a small DeepseekV3ForCausalLM trains to a
high accuracy on CPU in seconds, and once saved and loaded into our loop, its greedy tokens
through kvpager's engine equal transformers' own, token for token (float32, reference MLA)."""
from __future__ import annotations

import time

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="training the copy-task model needs transformers (pip install transformers)")

from kvpager.config import CacheConfig  # noqa: E402
from kvpager.examples.deepseek import gpu_check, trained  # noqa: E402
from kvpager.examples.deepseek.weights import load_model  # noqa: E402
from kvpager.runtime.engine import Engine  # noqa: E402
from kvpager.runtime.request import SamplingParams  # noqa: E402
from kvpager.runtime.scheduler import SchedulerConfig  # noqa: E402

SETTING = trained.SMALL
TASK = SETTING.task
STEPS = 16          # new tokens per prompt: prompts up to TASK.seq_len - STEPS tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        path = tmp_path_factory.mktemp("deepseek_v3_copy")
        report = trained.train_and_save(path, SETTING, "cpu", seed=0)
        print(f"trained in {time.perf_counter() - start:.1f} s: {report}")
        yield path, report
    finally:
        torch.set_num_threads(threads)


def test_training_reaches_high_accuracy(checkpoint):
    path, report = checkpoint
    assert report.accuracy >= 0.9, report
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(path).eval()
    assert trained.accuracy(hf, TASK, n=64, seed=123) >= 0.9   # sequences it never saw


def test_prompts_are_ragged_and_fit():
    prompts = trained.copy_prompts(8, TASK, STEPS, seed=0)
    assert len({len(p) for p in prompts}) > 1
    assert all(TASK.period + 2 <= len(p) <= TASK.seq_len - STEPS for p in prompts)
    assert all(p[0] == trained.BOS and len(set(p[1:TASK.period + 1])) == TASK.period for p in prompts)
    with pytest.raises(ValueError, match="period"):
        trained.CopyTask(vocab_size=16, period=15)


def test_engine_greedy_matches_transformers(checkpoint):
    path, _ = checkpoint
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(path).eval()
    ours = load_model(path)                     # CPU, float32: the reference MLA
    prompts = trained.copy_prompts(6, TASK, STEPS, seed=3)
    want_tokens, want_logits = trained.hf_greedy(hf, prompts, STEPS)

    rec = gpu_check.Recorded(ours)
    # 8-token pages, so each prompt spans several and decode crosses page boundaries.
    engine = Engine(rec, CacheConfig(num_layers=ours.num_layers, num_pages=64, page_size=8,
                                     allow_any_page_size=True, dtype="float32"),
                    SchedulerConfig(max_batch_size=len(prompts), max_model_len=TASK.seq_len))
    handles = [engine.submit(p, SamplingParams(max_new_tokens=STEPS), request_id=str(i))
               for i, p in enumerate(prompts)]
    while not all(h.finished for h in handles):
        engine.step()

    assert [h.output_token_ids for h in handles] == want_tokens
    got = torch.stack([torch.stack(rec.logits[str(i)]) for i in range(len(prompts))])
    assert (got - want_logits).abs().max().item() < 1e-4
    # ... and the model really copies: the continuation is the period, P tokens back.
    truth = [[p[1 + (len(p) - 1 + k) % TASK.period] for k in range(STEPS)] for p in prompts]
    assert (torch.tensor(want_tokens) == torch.tensor(truth)).float().mean() >= 0.9


def test_gpu_check_trained_comparison_runs_on_cpu(checkpoint):
    """The device run's comparison end to end, here with the reference MLA on both sides."""
    path, _ = checkpoint
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = gpu_check.compare_trained(str(path), TASK, batch=4, steps=STEPS, device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert set(results) == {"trained_kernel", "trained_hf_bf16", "trained_hf_fp32"}
    assert results["trained_kernel"]["teacher_forced_agreement"] == 1.0   # the same MLA on CPU
    assert results["trained_kernel"]["copy_accuracy"] >= 0.9
    assert results["trained_hf_fp32"]["teacher_forced_agreement"] >= 0.9


def test_fp8_cache_agrees_with_the_bf16_cache(checkpoint):
    """Issue 14's figure, small and on the CPU (reference MLA both sides): the trained model in
    bf16 through the engine with an FP8 cache vs its bf16 cache. Measured 1.000 teacher-forced
    and free-running (16 prompts x 16 steps), max |dlogit| 0.17 against a logit std of 1.55."""
    path, _ = checkpoint
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        figures = gpu_check.compare_fp8(str(path), TASK, batch=4, steps=STEPS, device="cpu")
    finally:
        torch.set_num_threads(threads)
    line = gpu_check.fp8_summary(figures, "cpu", torch.bfloat16, 4, STEPS)
    print(line)
    assert figures["teacher_forced_agreement"] >= gpu_check.FP8_BAR
    assert figures["free_running_agreement"] >= 0.9 and figures["copy_accuracy"] >= 0.9
    assert 0 < figures["mean_abs_logit_diff"] < 0.05 * figures["logit_std"]  # the FP8 cache ran
    assert line.startswith("fp8check PASS: teacher-forced ")


def test_gpu_check_fp8_mode_writes_its_summary_line(tmp_path, monkeypatch):
    """`gpu_check --fp8` (run_device.sh's fp8check stage) trains, compares, writes one line and
    exits 0 at or above the bar, 1 below it."""
    calls = []

    def fake_check(**kw):
        calls.append(kw)
        return {"teacher_forced_agreement": 0.98}, "fp8check FAIL: teacher-forced 0.9800"

    monkeypatch.setattr(gpu_check, "fp8_check", fake_check)
    summary = tmp_path / "fp8check.txt"
    code = gpu_check.main(["--fp8", "--small", "--device", "cpu", "--summary", str(summary)])
    assert code == 1 and summary.read_text() == "fp8check FAIL: teacher-forced 0.9800\n"
    assert calls[0]["setting"] is trained.SMALL and calls[0]["dtype"] is torch.bfloat16
