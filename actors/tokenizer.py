"""SD 1.x's text tokenizer, built offline: a light module (transformers only), so that the
pipeline's argument checks can count a prompt's tokens without loading diffusers or torch's
models."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from importlib.util import find_spec

from transformers import CLIPTokenizer


def clip_tokenizer() -> CLIPTokenizer:
    """SD 1.x's tokenizer (OpenAI CLIP BPE, 49,408 tokens) from the vocabulary that ships inside
    the open_clip_torch package, so tests tokenize class names exactly as SD does, offline. The
    file is found without importing open_clip, whose import (timm's models) takes a second."""
    folder = find_spec("open_clip").submodule_search_locations[0]
    with open(os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz"), "rb") as f:
        bpe = f.read()
    merges = gzip.decompress(bpe).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({tok: i for i, tok in enumerate(vocab)}, f)
        with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(d, model_max_length=77)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the BPE's base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))
