"""The text side of the grounding head: one embedding per class name.

Paper sec. 4.2 / appendix A: SD's own CLIP text encoder reads "a photograph of a {class}"; the
class embedding is its last hidden state averaged over the class word's tokens (a name such as
"hair drier" or "tvmonitor" spans several BPE tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor

from factory.prompts import TEMPLATE_ONE


class ClassEmbedder:
    """Class names -> (K, D) embeddings, each computed once and kept by this instance."""

    def __init__(self, tokenizer, text_encoder: torch.nn.Module,
                 template: str = TEMPLATE_ONE) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.template = template
        self.cache: dict[str, Tensor] = {}

    def token_span(self, name: str) -> tuple[int, int]:
        """[start, stop) of `name`'s tokens in the tokenized template (after the BOS token)."""
        prefix = self.template.split("{}")[0].strip()
        n_prefix = len(self.tokenizer(prefix, add_special_tokens=False).input_ids)
        name_ids = self.tokenizer(name, add_special_tokens=False).input_ids
        start = 1 + n_prefix
        full = self.tokenizer(self.template.format(name)).input_ids
        if not name_ids or full[start:start + len(name_ids)] != name_ids:
            raise ValueError(f"cannot find the tokens of class {name!r} in "
                             f"{self.template.format(name)!r}")
        return start, start + len(name_ids)

    @torch.no_grad()
    def __call__(self, names: list[str]) -> Tensor:
        new = [n for n in dict.fromkeys(names) if n not in self.cache]
        if new:
            device = next(self.text_encoder.parameters()).device
            ids = self.tokenizer([self.template.format(n) for n in new], padding="max_length",
                                 max_length=self.tokenizer.model_max_length, truncation=True,
                                 return_tensors="pt").input_ids.to(device)
            hidden = self.text_encoder(ids)[0]                               # (N, 77, D)
            for n, h in zip(new, hidden, strict=True):
                start, stop = self.token_span(n)
                self.cache[n] = h[start:stop].mean(0).float().cpu()           # (D,)
        return torch.stack([self.cache[n] for n in names])                   # (K, D)
