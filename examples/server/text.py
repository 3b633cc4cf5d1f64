"""Text <-> token ids for the example server: the checkpoint's tokenizer when its directory has
one, else plain ids (the text of a token is its id, space-separated; text prompts refused)."""
from __future__ import annotations

from pathlib import Path


class IdsText:
    """No tokenizer: generated text is the ids, e.g. " 17 42"; prompts must be token ids."""

    name = "token ids"

    def encode(self, text: str) -> list[int]:
        raise ValueError("this model has no tokenizer; send the prompt as a list of token ids")

    def decode(self, ids: list[int]) -> str:
        return "".join(f" {i}" for i in ids)


class TokenizerText:
    """A Hugging Face tokenizer loaded from the model directory (no download)."""

    def __init__(self, model_dir: str | Path):
        from kvpager.hub_kernels import import_transformers

        self._tok = import_transformers().AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.name = type(self._tok).__name__

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def text_for(model_dir: str | Path | None) -> IdsText | TokenizerText:
    """TokenizerText when model_dir holds tokenizer files, else IdsText."""
    if model_dir is not None and any((Path(model_dir) / f).is_file() for f in
                                     ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return TokenizerText(model_dir)
    return IdsText()
