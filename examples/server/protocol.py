"""The OpenAI `/v1/completions` wire format: the request body we accept (validated by pydantic,
with an error that names the field) and the JSON objects we send back.

Supported: prompt as text (when the model has a tokenizer), token ids, or a one-element list of
either; max_tokens, temperature, top_p, seed, stream, stop (strings, with a tokenizer) and the
extension `stop_token_ids`, top_k, and logprobs (0..5: each token's log-probability under the
model's raw logits, plus the n most likely tokens', in OpenAI's completions shape; streamed
chunks carry their tokens' share). Fields OpenAI defines that we cannot honour (n > 1, echo,
best_of, suffix, penalties, logit_bias) are refused with a 400 rather than ignored.
Each choice also carries `token_ids`, the generated ids.
"""
from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_LOGPROBS = 5  # OpenAI's limit for /v1/completions


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stream: bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    user: str | None = None
    # OpenAI fields we refuse unless left at their defaults.
    n: Literal[1] = 1
    best_of: Literal[1] | None = None
    echo: Literal[False] = False
    suffix: None = None
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    logit_bias: None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream_options: dict | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError(f"{len(prompt)} prompts in one request; send one prompt per request")
            prompt = prompt[0]
        if isinstance(prompt, (str, list)) and len(prompt) == 0:
            raise ValueError("the prompt is empty; send at least one token")
        return prompt


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def logprobs_body(token_texts: list[str], token_ids: list[int], logprobs: list[float],
                  top_logprobs: list[dict[int, float]] | None, decode, offset: int = 0) -> dict:
    """OpenAI's completions `logprobs` object for these tokens: their texts, logprobs, text
    offsets (from `offset`, the text already sent) and, per token, the n most likely tokens
    and the sampled one ({text: logprob}; decode([id]) names them)."""
    offsets = []
    for piece in token_texts:
        offsets.append(offset)
        offset += len(piece)
    tops = []
    for i, (tid, lp) in enumerate(zip(token_ids, logprobs)):
        top = {decode([t]): v for t, v in (top_logprobs[i].items() if top_logprobs else ())}
        top.setdefault(token_texts[i], lp)
        tops.append(top)
    return {"tokens": token_texts, "token_logprobs": list(logprobs), "top_logprobs": tops,
            "text_offset": offsets}


def completion_body(request_id: str, model: str, text: str, token_ids: list[int],
                    finish_reason: str | None, prompt_tokens: int, logprobs: dict | None = None) -> dict:
    return {
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "token_ids": token_ids, "logprobs": logprobs,
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(token_ids),
                  "total_tokens": prompt_tokens + len(token_ids)},
    }


def chunk_body(request_id: str, model: str, text: str, token_ids: list[int],
               finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": text, "token_ids": token_ids, "logprobs": logprobs,
                     "finish_reason": finish_reason}],
    }
