"""Every bad input a user can hand the library gets a KVPagerError subclass whose message names
the bad value, and changes nothing. CASES is the table in docs/bad-inputs.md (a test keeps the
two in step); the CLI's rows are tested in tests/test_cli.py."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from kvpager import (BlockAllocator, CacheConfig, PagePool, Sequence, flash_mla_with_kvcache,
                     get_mla_metadata)
from kvpager.errors import (ConfigError, DoubleFree, DuplicateRequest, InvalidArgument,
                            KVPagerError, ReentrantStep, RequestError, RequestTooLarge,
                            UnknownRequest)
from kvpager.runtime.engine import Engine
from kvpager.runtime.models.tiny import TinyMLA
from kvpager.runtime.request import SamplingParams
from kvpager.runtime.scheduler import SchedulerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = TinyMLA(num_layers=1, num_heads=4, hidden=16, vocab_size=64, seed=1)
NO_CUDA = not torch.cuda.is_available()


def engine(**kw) -> Engine:
    return Engine(MODEL, MODEL.cache_config(8), SchedulerConfig(max_batch_size=4, max_model_len=256), **kw)


def cache(**kw) -> CacheConfig:
    return CacheConfig(**{"num_layers": 1, "num_pages": 4, "dtype": "float32", **kw})


def mla_with_metadata_for_other_heads():
    lens = torch.tensor([70, 5], dtype=torch.int32)
    meta, splits = get_mla_metadata(lens, 16, 1)  # planned for h_q = 16
    q = torch.zeros(2, 1, 128, 576)  # used with h_q = 128
    k_cache = torch.zeros(4, 64, 1, 576)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    flash_mla_with_kvcache(q, k_cache, table, lens, 512, meta, splits)


def submit(*args, **kw):
    return lambda: engine().submit(*args, **kw)


def duplicate_id():
    eng = engine()
    eng.submit([1], request_id="a")
    eng.submit([2], request_id="a")


def step_from_a_callback():
    eng = engine()
    raised = []

    def on_token(rid, tok):
        try:
            eng.step()
        except ReentrantStep as exc:
            raised.append(exc)

    eng.submit([1], SamplingParams(max_new_tokens=1), on_token=on_token)
    eng.step()
    raise raised[0]


# (input as docs/bad-inputs.md shows it, the call, the error, a regex its message matches)
CASES = [
    # configs: strict pydantic models, extra="forbid"
    ("SchedulerConfig(max_batch_size='8')", lambda: SchedulerConfig(max_batch_size="8"),
     ConfigError, r"max_batch_size='8' is a str, not an int"),
    ("SchedulerConfig(max_batch=8)", lambda: SchedulerConfig(max_batch=8),
     ConfigError, r"max_batch is not a SchedulerConfig field; did you mean max_batch_size\?"),
    ("SchedulerConfig(max_model_len=1.5)", lambda: SchedulerConfig(max_model_len=1.5),
     ConfigError, r"max_model_len=1.5 is a float"),
    ("SchedulerConfig(max_batch_size=0)", lambda: SchedulerConfig(max_batch_size=0),
     ConfigError, r"max_batch_size=0 must be >= 1"),
    ("SchedulerConfig(num_speculative_tokens=-1)", lambda: SchedulerConfig(num_speculative_tokens=-1),
     ConfigError, r"num_speculative_tokens=-1 must be >= 0"),
    ("SchedulerConfig(max_batch_size=64, max_num_batched_tokens=32)",
     lambda: SchedulerConfig(max_batch_size=64, max_num_batched_tokens=32),
     ConfigError, r"cannot decode a full batch"),
    ("SchedulerConfig(enable_prefix_caching=1)", lambda: SchedulerConfig(enable_prefix_caching=1),
     ConfigError, r"enable_prefix_caching=1 is a int, not True or False"),
    ("Engine(pool of 3 pages, SchedulerConfig(enable_prefix_caching=True, max_model_len=256))",
     lambda: Engine(MODEL, MODEL.cache_config(3),
                    SchedulerConfig(enable_prefix_caching=True, max_model_len=256)),
     ConfigError, r"prefix caching with 3 usable pages .* raise num_pages .* to at least 4, or lower "
                  r"max_model_len"),
    ("SamplingParams(stop_token_ids=1)", lambda: SamplingParams(stop_token_ids=1),
     RequestError, r"stop_token_ids=1 must be a sequence.*stop_token_ids=\[1\]"),
    ("SamplingParams(stop_token_ids=[1.5])", lambda: SamplingParams(stop_token_ids=[1.5]),
     RequestError, r"stop_token_ids\[0\]=1.5 is a float"),
    ("SamplingParams(top_k=1.5)", lambda: SamplingParams(top_k=1.5),
     RequestError, r"top_k=1.5 is a float, not an int"),
    ("SamplingParams(max_new_tokens='8')", lambda: SamplingParams(max_new_tokens="8"),
     RequestError, r"max_new_tokens='8' is a str"),
    ("SamplingParams(max_new_tokens=True)", lambda: SamplingParams(max_new_tokens=True),
     RequestError, r"max_new_tokens=True is a bool"),
    ("SamplingParams(max_new_tokens=0)", lambda: SamplingParams(max_new_tokens=0),
     RequestError, r"max_new_tokens=0 must be >= 1"),
    ("SamplingParams(temperature=nan)", lambda: SamplingParams(temperature=math.nan),
     RequestError, r"temperature=nan must be a finite number"),
    ("SamplingParams(temperature=-1.0)", lambda: SamplingParams(temperature=-1.0),
     RequestError, r"temperature=-1.0 must be >= 0"),
    ("SamplingParams(top_p=0.0)", lambda: SamplingParams(top_p=0.0), RequestError, r"top_p=0.0"),
    ("SamplingParams(seed=-1)", lambda: SamplingParams(seed=-1), RequestError, r"seed=-1"),
    ("SamplingParams(logprobs=21)", lambda: SamplingParams(logprobs=21), RequestError,
     r"logprobs=21 must be None \(off\) or in \[0, 20\]"),
    ("SchedulerConfig(max_prefill_padding=1.0)", lambda: SchedulerConfig(max_prefill_padding=1.0),
     ConfigError, r"max_prefill_padding=1.0 must be in \[0, 1\)"),
    ("SamplingParams(temprature=0.5)", lambda: SamplingParams(temprature=0.5),
     RequestError, r"temprature is not a SamplingParams field; did you mean temperature\?"),
    ("CacheConfig(device='cuda') without CUDA",
     lambda: cache(device="cuda") if NO_CUDA else cache(device="cuda:99"),
     ConfigError, r"device='cuda(:99)?': (this torch build has no CUDA|no CUDA GPU|only)"),
    ("CacheConfig(devise='cpu')", lambda: cache(devise="cpu"),
     ConfigError, r"devise is not a CacheConfig field; did you mean device\?"),
    # allocator and sequences
    ("BlockAllocator(2.5)", lambda: BlockAllocator(2.5), InvalidArgument, r"num_pages=2.5 \(float\)"),
    ("allocate(2.5)", lambda: BlockAllocator(4).allocate(2.5), InvalidArgument, r"n=2.5 \(float\)"),
    ("allocate('3')", lambda: BlockAllocator(4).allocate("3"), InvalidArgument, r"n='3' \(str\)"),
    ("allocate(True)", lambda: BlockAllocator(4).allocate(True), InvalidArgument, r"n=True \(bool\)"),
    ("allocate(-1)", lambda: BlockAllocator(4).allocate(-1), InvalidArgument, r"n=-1"),
    ("can_allocate(2.5)", lambda: BlockAllocator(4).can_allocate(2.5), InvalidArgument, r"n=2.5"),
    ("free(5) on a fresh allocator", lambda: BlockAllocator(8).free(5),
     InvalidArgument, r"pages=5 must be a list of page ids.*pass \[5\]"),
    ("free([5]) on a fresh allocator", lambda: BlockAllocator(8).free([5]),
     DoubleFree, r"page 5 is already free"),
    ("free({1: 2}) (a dict as pages)", lambda: BlockAllocator(8).free({1: 2}),
     InvalidArgument, r"pages=\{1: 2\} must be a list"),
    ("incref(None)", lambda: BlockAllocator(8).incref(None), InvalidArgument, r"pages=None"),
    ("Sequence(page_size=32) on a 64-token pool's allocator",
     lambda: Sequence("s", BlockAllocator(8, page_size=64), page_size=32),
     InvalidArgument, r"page_size=32 differs from the page size of the pool.*\(64\)"),
    ("Sequence('s', None)", lambda: Sequence("s", None), InvalidArgument, r"must be a BlockAllocator"),
    ("Sequence.append(2.5)", lambda: Sequence("s", BlockAllocator(8)).append(2.5),
     InvalidArgument, r"token count 2.5 must be an int"),
    ("PagePool({'num_layers': 1})", lambda: PagePool({"num_layers": 1}),
     InvalidArgument, r"PagePool takes a CacheConfig, got dict"),
    ("pool.layer(2.5)", lambda: PagePool(cache()).layer(2.5), InvalidArgument,
     r"layer 2.5 is not an int in \[0, 1\)"),
    ("pool.write(0, slots, [0.0] * 576)",
     lambda: PagePool(cache()).write(0, torch.tensor([0]), [0.0] * 576), InvalidArgument,
     r"latent must be a tensor"),
    ("MLA metadata for h_q=16 used with h_q=128", mla_with_metadata_for_other_heads,
     InvalidArgument, r"computed for other heads"),
    # the engine
    ("Engine(model, cache_config='x')", lambda: Engine(MODEL, "x"), ConfigError, r"CacheConfig"),
    ("Engine(model, cache, config={'max_batch_size': 8})",
     lambda: Engine(MODEL, MODEL.cache_config(4), {"max_batch_size": 8}), ConfigError,
     r"SchedulerConfig or None, got dict"),
    ("Engine(object(), cache)", lambda: Engine(object(), MODEL.cache_config(4)),
     ConfigError, r"Model protocol"),
    ("Engine(..., retain_finished=-1)", lambda: engine(retain_finished=-1),
     ConfigError, r"retain_finished=-1"),
    ("submit('hello')", submit("hello"), RequestError, r"tokenize text first"),
    ("submit(5)", submit(5), RequestError, r"must be a list of token ids"),
    ("submit([1.5])", submit([1.5]), RequestError, r"prompt token 1.5 at position 0 is a float"),
    ("submit([True])", submit([True]), RequestError, r"prompt token True at position 0 is a bool"),
    ("submit([1, 64]) (vocab 64)", submit([1, 64]), RequestError,
     r"token id 64 at position 1 is outside the model's vocabulary \[0, 64\)"),
    ("submit([-1])", submit([-1]), RequestError, r"token id -1 at position 0"),
    ("submit([])", submit([]), RequestError, r"empty prompt"),
    ("submit(torch.tensor([[1, 2]]))", submit(torch.tensor([[1, 2]])), RequestError, r"1-d integer"),
    ("submit(torch.tensor([1.0]))", submit(torch.tensor([1.0])), RequestError, r"1-d integer"),
    ("submit([1], params={'max_new_tokens': 4})", submit([1], {"max_new_tokens": 4}),
     RequestError, r"params must be a SamplingParams, got dict"),
    ("submit([1], request_id=5)", submit([1], request_id=5), RequestError, r"request_id=5 \(int\)"),
    ("submit([1], on_token=5)", submit([1], on_token=5), RequestError, r"on_token=5 is not callable"),
    ("submit([1], arrival_time='x')", submit([1], arrival_time="x"), RequestError, r"arrival_time='x'"),
    ("submit([1], arrival_time=nan)", submit([1], arrival_time=math.nan), RequestError, r"arrival_time=nan"),
    ("submit([1], arrival_time=True)", submit([1], arrival_time=True), RequestError, r"arrival_time=True"),
    ("submit with a request id in use", duplicate_id, DuplicateRequest, r"'a' was already submitted"),
    ("submit([1] * 300, max_new_tokens=200) (max_model_len 256)",
     submit([1] * 300, SamplingParams(max_new_tokens=200)), RequestTooLarge, r"max_model_len"),
    ("generate('hello')", lambda: engine().generate("hello"), RequestError,
     r"prompts='hello' must be a list of prompts"),
    ("generate([[1], []])", lambda: engine().generate([[1], []]), RequestError, r"empty prompt"),
    ("generate([[1], [2]], [SamplingParams()])",
     lambda: engine().generate([[1], [2]], [SamplingParams()]), RequestError, r"1 SamplingParams for 2 prompts"),
    ("generate([[1], [2]], [SamplingParams(), {'max_new_tokens': 2}])",
     lambda: engine().generate([[1], [2]], [SamplingParams(), {"max_new_tokens": 2}]),
     RequestError, r"params must be a SamplingParams, got dict"),
    ("step() inside an on_token callback", step_from_a_callback, ReentrantStep,
     r"called from inside a step"),
    ("abort(['a'])", lambda: engine().abort(["a"]), RequestError, r"request_id=\['a'\] \(list\)"),
    ("abort('nope')", lambda: engine().abort("nope"), UnknownRequest, r"'nope' is known"),
]


@pytest.mark.parametrize("label, call, error, match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_typed_error_naming_it(label, call, error, match):
    assert issubclass(error, KVPagerError)
    with pytest.raises(error, match=match):
        call()


def test_every_case_is_in_the_docs_table():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md").read_text()
    listed = set(re.findall(r"^\| `(.+?)` \|", doc, re.M))
    missing = [label for label, *_ in CASES if label not in listed]
    assert not missing, f"add these to docs/bad-inputs.md: {missing}"


def test_rejected_submits_change_nothing():
    eng = engine()
    ok = eng.submit([1, 2], SamplingParams(max_new_tokens=3), request_id="ok")
    for bad in ("hello", [1.5], [64], []):
        with pytest.raises(RequestError):
            eng.submit(bad)
    for kw in ({"request_id": 5}, {"on_token": 5}, {"arrival_time": "x"}, {"request_id": "ok"}):
        with pytest.raises(RequestError):
            eng.submit([1], **kw)
    assert list(eng.requests) == ["ok"] and len(eng.scheduler.waiting) == 1
    assert eng.allocator.num_used == 0
    while eng.has_unfinished():
        eng.step()
    assert len(ok.output_token_ids) == 3 and eng.allocator.num_used == 0


def test_integer_arrays_and_numpy_scalars_are_accepted():
    eng = engine()
    a = eng.submit(np.array([1, 2, 3]), SamplingParams(max_new_tokens=2, stop_token_ids=[np.int64(9)]))
    b = eng.submit(torch.tensor([1, 2, 3]), SamplingParams(max_new_tokens=np.int64(2)))
    c = eng.submit([np.int64(1), 2, 3], SamplingParams(max_new_tokens=2), arrival_time=np.float64(0.5))
    while eng.has_unfinished():
        eng.step()
    assert a.output_token_ids == b.output_token_ids == c.output_token_ids
    assert SchedulerConfig(max_batch_size=np.int64(8)).max_batch_size == 8


def test_auto_ids_never_collide_with_user_ids():
    eng = engine()
    eng.submit([1], request_id="1")
    ids = [eng.submit([2]).request_id for _ in range(3)]
    assert "1" not in ids and len(set(ids)) == 3


def test_configs_stay_frozen_and_comparable():
    config = SchedulerConfig(max_batch_size=8)
    with pytest.raises(Exception):
        config.max_batch_size = 9
    assert config == SchedulerConfig(max_batch_size=8) and hash(config) == hash(SchedulerConfig(max_batch_size=8))
    assert SamplingParams(stop_token_ids=[1, 2]).stop_token_ids == (1, 2)
