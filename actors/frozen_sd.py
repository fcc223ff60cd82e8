"""The frozen SD parts that read generated samples: the UNet (features, recomputed from the stored
x_t) and the text encoder (class embeddings). The grounding head's trainer and the grounding
labeller share it, so no stage imports the trainer."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from actors.class_embeddings import ClassEmbedder
from actors.features import FeatureExtractor, encode_prompts
from actors.sd import load_sd


class FrozenSD:
    """SD's UNet (features) and text encoder (class embeddings), loaded once per worker, frozen;
    bf16 on a GPU, float32 on the CPU."""

    def __init__(self, model: str, device: str | torch.device) -> None:
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.pipe = load_sd(model, device=self.device, dtype=dtype)
        self.extractor = FeatureExtractor(self.pipe.unet)
        self.embedder = ClassEmbedder(self.pipe.tokenizer, self.pipe.text_encoder)

    def head_overrides(self) -> dict:
        """The head's config fields that depend on this SD."""
        return {"in_channels": tuple(self.extractor.channels),
                "text_dim": self.pipe.text_encoder.config.hidden_size}

    def features(self, batch: dict[str, np.ndarray]) -> list[Tensor]:
        """The feature groups of a batch with x_t (B, 4, h, w), t (B,) and prompt (B,)."""
        # copies: Ray Data hands read-only arrays, which torch.from_numpy warns about
        x_t = torch.from_numpy(np.array(batch["x_t"])).to(self.device)
        t = torch.from_numpy(np.array(batch["t"])).to(self.device)
        cond, uncond = encode_prompts(self.pipe, [str(p) for p in batch["prompt"]])
        return self.extractor(x_t, t, cond, uncond)

    def class_embeddings(self, names: list[list[str]]) -> tuple[Tensor, Tensor]:
        """Per sample a list of class names ("" = padding) -> embeddings B x K x D and valid
        B x K (a real name), padded to the longest list."""
        k = max(map(len, names))
        rows = [list(r) + [""] * (k - len(r)) for r in names]
        flat = [n for row in rows for n in row if n]
        emb = dict(zip(flat, self.embedder(flat), strict=True)) if flat else {}
        dim = self.pipe.text_encoder.config.hidden_size
        text = torch.stack([torch.stack([emb[n] if n else torch.zeros(dim) for n in row])
                            for row in rows]).to(self.device)               # (B, K, D)
        valid = torch.tensor([[bool(n) for n in row] for row in rows], device=self.device)
        return text, valid

    def inputs(self, batch: dict[str, np.ndarray]) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """A `training_batch` -> (features, class embeddings B x K x D, valid B x K, masks
        B x K x H x W), on this device."""
        text, _ = self.class_embeddings([list(c) for c in batch["classes"]])
        valid = torch.from_numpy(np.asarray(batch["valid"], dtype=bool)).to(self.device)
        masks = torch.from_numpy(np.asarray(batch["masks"])).to(self.device)
        return self.features(batch), text, valid, masks
