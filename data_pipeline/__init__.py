"""Interleaved text+image data for megaflow: MDS writers, tokenizers, packed Streaming loaders.

Public entry points (see docs/DATA.md): DataConfig, TokenizerSpec, build_loader, load_tokenizer,
train_sentencepiece, build_dataset, load_class_names. Heavy imports (Streaming, torch) happen on
first use of the names that need them.
"""

from data_pipeline.config import DataConfig, TokenizerSpec

__all__ = ["DataConfig", "TokenizerSpec", "build_loader", "load_tokenizer", "train_sentencepiece",
           "build_dataset", "load_class_names", "Tokenizer"]


def __getattr__(name):
    if name in ("build_loader", "Loader"):
        from data_pipeline import loader

        return getattr(loader, name)
    if name in ("load_tokenizer", "train_sentencepiece", "Tokenizer"):
        from data_pipeline import tokenizer

        return getattr(tokenizer, name)
    if name in ("build_dataset", "load_class_names"):
        from data_pipeline import writers

        return getattr(writers, name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
