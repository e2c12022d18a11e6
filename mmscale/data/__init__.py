"""Data: sentencepiece tokenizers, MDS preparation, the streaming loader and the built-in stories.

Submodules are imported lazily (streaming and torch are heavy); import what you need:

    from mmscale.data.loader import build_dataloader, check_dataset
    from mmscale.data.tokenizer import train_tokenizer, load_tokenizer
    from mmscale.data.prepare import prepare, PrepareOptions
    from mmscale.data.synth import generate_stories, write_corpus
"""
