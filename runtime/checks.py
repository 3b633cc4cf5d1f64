"""The engine's boundary checks: everything a user hands `Engine(...)`, `submit` or `abort` is
checked here before anything changes, and a bad value raises a KVPagerError subclass naming it
(docs/bad-inputs.md lists them). Also the one-time CPU threads warning."""
from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterable

import numpy as np
import torch

from kvpager import CacheConfig
from kvpager.errors import ConfigError, RequestError
from kvpager.runtime.models.protocol import Model
from kvpager.runtime.request import SamplingParams
from kvpager.runtime.scheduler import SchedulerConfig

logger = logging.getLogger("kvpager")


def check_prompt(token_ids: object, vocab_size: int) -> list[int]:
    """The prompt as a list of ints, each in [0, vocab_size); RequestError naming the first bad
    one otherwise. Accepts a sequence of ints or an integer numpy array / torch tensor [n]."""
    if isinstance(token_ids, (torch.Tensor, np.ndarray)):
        integer = (token_ids.dtype.kind in "iu" if isinstance(token_ids, np.ndarray) else
                   not (token_ids.dtype.is_floating_point or token_ids.dtype.is_complex
                        or token_ids.dtype == torch.bool))
        if token_ids.ndim != 1 or not integer:
            raise RequestError(f"prompt_token_ids must be a 1-d integer array, got "
                               f"{token_ids.dtype} {tuple(token_ids.shape)}")
        token_ids = token_ids.tolist()
    elif isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Iterable):
        raise RequestError(f"prompt_token_ids={token_ids!r:.40} must be a list of token ids "
                           f"(ints); tokenize text first")
    prompt = []
    for i, t in enumerate(token_ids):
        if type(t) is not int:
            t = _token(t, i)
        if not 0 <= t < vocab_size:
            raise RequestError(f"prompt token id {t} at position {i} is outside the model's "
                               f"vocabulary [0, {vocab_size})")
        prompt.append(t)
    if not prompt:
        raise RequestError("empty prompt: a request needs at least one prompt token")
    return prompt


def _token(value: object, i: int) -> int:
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise RequestError(f"prompt token {value!r} at position {i} is a {type(value).__name__}, not "
                       f"an int token id")


def check_engine_args(model: object, cache_config: object, config: object, clock: object,
                       retain_finished: object, full_metrics: object) -> None:
    if not isinstance(model, Model):
        raise ConfigError(f"model {type(model).__name__} does not follow the Model protocol "
                          f"(num_layers, num_heads, vocab_size, prefill, decode); see "
                          f"kvpager.runtime.models.protocol")
    if not isinstance(cache_config, CacheConfig):
        raise ConfigError(f"cache_config must be a CacheConfig, got {type(cache_config).__name__}")
    if config is not None and not isinstance(config, SchedulerConfig):
        raise ConfigError(f"config must be a SchedulerConfig or None, got {type(config).__name__}")
    if not callable(clock):
        raise ConfigError(f"clock={clock!r} must be callable (returns seconds)")
    if type(retain_finished) is not int or retain_finished < 0:
        raise ConfigError(f"retain_finished={retain_finished!r} must be an int >= 0 (finished "
                          f"requests the engine remembers)")
    if not isinstance(full_metrics, bool):
        raise ConfigError(f"full_metrics={full_metrics!r} must be True or False")


_threads_warned = False


def warn_cpu_threads() -> None:
    """Once per process: torch's intra-op threads turn microsecond ops into contention (2
    prompts x 16 tokens of the tiny model: 8.8 s at 2 threads on a busy 2-core machine, 0.03 s
    at one)."""
    global _threads_warned
    threads = torch.get_num_threads()
    if _threads_warned or threads <= 1:
        return
    _threads_warned = True
    logger.warning(
        "kvpager: engine on the CPU with torch using %d threads; small models run much faster "
        "with torch.set_num_threads(1), above all on a busy machine (README, 'Threads')", threads)


def check_submit_args(params: object, request_id: object, on_token: object,
                      arrival_time: object) -> None:
    if not isinstance(params, SamplingParams):
        raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}; "
                           f"build one, e.g. SamplingParams(max_new_tokens=16)")
    if request_id is not None:
        check_request_id(request_id, "a str or None (None: the engine picks one)")
    if on_token is not None and not callable(on_token):
        raise RequestError(f"on_token={on_token!r} is not callable; pass a function "
                           f"on_token(request_id, token) or None")
    if arrival_time is not None and (isinstance(arrival_time, bool) or not isinstance(
            arrival_time, (int, float)) or not math.isfinite(arrival_time)):
        raise RequestError(f"arrival_time={arrival_time!r} must be a finite number of seconds on "
                           f"the engine's clock, or None (now)")


def check_request_id(request_id: object, wanted: str = "a str") -> None:
    if not isinstance(request_id, str):
        raise RequestError(f"request_id={request_id!r} ({type(request_id).__name__}) must be "
                           f"{wanted}")
