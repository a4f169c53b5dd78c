"""Phrase clustering without an N x N matrix gives the clusters of the dense algorithm it replaces.

The reference below is the dense algorithm `finelap data cluster` used before (scipy's pdist,
linkage and fcluster, names from the full similarity matrix), kept here as the oracle. One rule
is written down where the dense code left it to rounding: members whose mean similarity to their
cluster is within 1e-9 of the best are tied, and the earliest names the cluster (in a cluster of
two, the two means differ only in the last bits of each vector's norm).
"""
import hashlib
import json
import tracemalloc

import faiss
import numpy
import pytest
import torch
from scipy.cluster import hierarchy
from scipy.spatial.distance import pdist

from finelap.data.phrase_bank import (
    DEFAULT_CLUSTER_THRESHOLD, LINKAGES, NAME_TIE, PhraseBank, agglomerate, cluster_phrases, minilm_embedder,
    normalise_phrase, similar_pairs,
)
from finelap.data_cli import main as data_cli


def dense_reference(texts, vectors, threshold, linkage):
    """[(members, the members tied for most central)] per cluster, clusters by first member:
    the dense algorithm (N x N distances and similarities)."""
    distances = numpy.clip(pdist(vectors, metric="cosine"), 0.0, 2.0)
    labels = hierarchy.fcluster(hierarchy.linkage(distances, method=linkage), t=1.0 - threshold, criterion="distance")
    members = {}
    for index, label in enumerate(labels):
        members.setdefault(int(label), []).append(index)
    similarity = vectors @ vectors.T.copy()  # a copy: not OpenBLAS's syrk, which crashes on large inputs
    clusters = []
    for group in sorted(members.values(), key=lambda g: g[0]):
        centrality = similarity[numpy.ix_(group, group)].mean(axis=1)
        central = [texts[i] for i, c in zip(group, centrality) if c >= centrality.max() - NAME_TIE]
        clusters.append(([texts[i] for i in group], central))
    return clusters


def assert_same_bank(bank, reference):
    assert len(bank) == len(reference)
    for number, (members, central) in enumerate(reference):
        assert list(bank.alternatives(number)) == members, number
        assert bank.cluster_name(number) == central[0], (number, central)


# ---------------------------------------------------------------- planted synonym groups


def planted_phrases(groups=400, per_group=(2, 12), seed=0):
    """(phrases, group of each): groups of synonyms, some groups confusable with another (their
    centres correlated), so that the graph above the threshold has large connected parts."""
    rng = numpy.random.default_rng(seed)
    texts, group_of = [], []
    for group in range(groups):
        for variant in range(int(rng.integers(*per_group))):
            texts.append(f"sound {group} heard as variant {variant}")
            group_of.append(group)
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], [group_of[i] for i in order]


def planted_embedder(texts, group_of, width=24, spread=0.3, seed=0):
    """embed(texts) -> [N, width]: each phrase its group's centre plus noise fixed by its text."""
    rng = numpy.random.default_rng(seed)
    centres = rng.standard_normal((max(group_of) + 1, width))
    centres[1::2] = 0.7 * centres[0::2][: len(centres[1::2])] + 0.7 * centres[1::2]  # confusable pairs
    group_by_text = dict(zip(texts, group_of))

    def embed(batch):
        rows = []
        for text in batch:
            noise_seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            noise = numpy.random.default_rng(noise_seed).standard_normal(width)
            rows.append(centres[group_by_text[text]] + spread * numpy.linalg.norm(centres[0]) / width**0.5 * noise)
        return torch.tensor(numpy.array(rows), dtype=torch.float32)

    return embed


def unit_vectors(embed, texts):
    return torch.nn.functional.normalize(embed(texts).double(), dim=-1).numpy()


@pytest.fixture(scope="module")
def planted():
    texts, group_of = planted_phrases()
    return texts, group_of, planted_embedder(texts, group_of)


@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize("threshold", [DEFAULT_CLUSTER_THRESHOLD, 0.8])
def test_clusters_equal_the_dense_algorithm_on_thousands_of_phrases(planted, linkage, threshold):
    texts, group_of, embed = planted
    assert len(texts) > 2500
    bank = cluster_phrases(texts, embed=embed, threshold=threshold, linkage=linkage)
    assert_same_bank(bank, dense_reference(texts, unit_vectors(embed, texts), threshold, linkage))
    if (linkage, threshold) == ("average", DEFAULT_CLUSTER_THRESHOLD):  # every planted group within one cluster
        for group in set(group_of):
            members = [text for text, g in zip(texts, group_of) if g == group]
            assert len({bank.cluster_of(text) for text in members}) == 1, group


@pytest.mark.parametrize("linkage", LINKAGES)
def test_agglomeration_equals_scipy_where_the_graph_is_dense(linkage):
    """Heavy overlap: pairs above a low threshold are a fifth of all pairs, single linkage chains
    everything into one cluster, average and complete linkage merge over many rounds."""
    rng = numpy.random.default_rng(3)
    vectors = rng.standard_normal((40, 12))[rng.integers(0, 40, 2000)] + rng.standard_normal((2000, 12))
    vectors /= numpy.linalg.norm(vectors, axis=1, keepdims=True)
    for threshold in (0.3, 0.55, 0.9):
        labels = agglomerate(vectors, threshold, linkage)
        reference = hierarchy.fcluster(
            hierarchy.linkage(numpy.clip(pdist(vectors, "cosine"), 0, 2), method=linkage),
            t=1.0 - threshold, criterion="distance",
        )
        first_member = {}
        for index, label in enumerate(reference):
            first_member.setdefault(label, index)
        assert numpy.array_equal(labels, [first_member[label] for label in reference]), threshold


@pytest.mark.parametrize("block_rows", [None, 4096, 700, 1])
def test_similar_pairs_are_exactly_the_pairs_within_the_cut(block_rows):
    """Every pair at or above the threshold, none below, float64 distances as pdist's, for blocks
    that divide the rows or not."""
    rng = numpy.random.default_rng(5)
    vectors = rng.standard_normal((300, 16))[rng.integers(0, 300, 2500)] + 0.8 * rng.standard_normal((2500, 16))
    vectors /= numpy.linalg.norm(vectors, axis=1, keepdims=True)
    distances = numpy.clip(pdist(vectors, "cosine"), 0, 2)
    rows, columns = numpy.triu_indices(len(vectors), 1)  # pdist's order
    within = numpy.flatnonzero(distances <= 1 - 0.55)
    within = within[numpy.lexsort((rows[within], columns[within]))]  # by j, then i
    first, second, distance = similar_pairs(vectors, 0.55, block_rows=block_rows)
    assert numpy.array_equal(first, rows[within]) and numpy.array_equal(second, columns[within])
    assert numpy.abs(distance - distances[within]).max() < 1e-14


def test_the_bank_is_the_same_bytes_for_any_thread_count(planted, tmp_path):
    """faiss's search is the one threaded step (numpy multiplies no matrix)."""
    texts, _, embed = planted
    threads = faiss.omp_get_max_threads()
    for count in (1, 3):
        faiss.omp_set_num_threads(count)
        try:
            cluster_phrases(texts, embed=embed).write(tmp_path / f"threads{count}.jsonl")
        finally:
            faiss.omp_set_num_threads(threads)
    assert (tmp_path / "threads1.jsonl").read_bytes() == (tmp_path / "threads3.jsonl").read_bytes()


def test_twenty_thousand_phrases_hold_no_n_by_n_matrix():
    """Where the dense algorithm needed about 12 N^2 bytes (4.8 GB here) and crashed in OpenBLAS,
    the graph's arrays stay small."""
    texts, group_of = planted_phrases(groups=4000, per_group=(3, 8), seed=1)
    texts, group_of = texts[:20000], group_of[:20000]
    embeddings = planted_embedder(texts, group_of, width=64)(texts)

    def embed(batch):
        assert batch == texts  # distinct phrases, embedded in their order
        return embeddings

    tracemalloc.start()
    bank = cluster_phrases(texts, embed=embed)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 2**20  # numpy's and Python's allocations (29 MiB seen); the vectors alone are 10 MiB
    found = {}
    for text, group in zip(texts, group_of):
        found.setdefault(group, set()).add(bank.cluster_of(text))
    assert sum(len(clusters) == 1 for clusters in found.values()) / len(found) > 0.99


# ---------------------------------------------------------------- real phrases, names


REAL_PHRASES = [
    f"{source} {sound}{where}"
    for source, sounds in [
        ("dog", ["barking", "growling", "whining"]), ("puppy", ["barking", "yapping"]), ("cat", ["meowing", "purring"]),
        ("car", ["passing by", "honking", "engine idling"]), ("truck", ["rumbling", "reversing"]),
        ("man", ["speaking", "laughing", "coughing"]), ("woman", ["speaking", "singing"]),
        ("baby", ["crying", "laughing"]), ("rain", ["falling", "on a roof"]), ("wind", ["blowing", "howling"]),
        ("bell", ["ringing", "tolling"]), ("siren", ["wailing"]), ("door", ["slamming", "creaking"]),
        ("water", ["flowing", "dripping"]), ("bird", ["chirping", "singing"]), ("guitar", ["playing", "strumming"]),
    ]
    for sound in sounds
    for where in ["", " loudly", " in the distance", " outdoors", " nearby"]
]


def test_real_phrases_cluster_as_the_dense_algorithm_does():
    """all-MiniLM-L6-v2 embeddings of a few hundred sound phrases, every linkage."""
    minilm = minilm_embedder()
    table = dict(zip(REAL_PHRASES, minilm(REAL_PHRASES)))

    def embed(texts):
        return torch.stack([table[text] for text in texts])

    vectors = unit_vectors(embed, REAL_PHRASES)
    for linkage in LINKAGES:
        bank = cluster_phrases(REAL_PHRASES, embed=embed, linkage=linkage)
        assert_same_bank(bank, dense_reference(REAL_PHRASES, vectors, 0.55, linkage))
    bank = cluster_phrases(REAL_PHRASES, embed=embed)
    assert bank.cluster_of("dog barking") == bank.cluster_of("dog barking loudly")


def test_a_cluster_is_named_by_its_most_central_member_earliest_on_ties():
    vectors = {"a": [1.0, 0.0, 0.0], "b": [0.8, 0.6, 0.0], "c": [0.6, 0.8, 0.0],  # b is central
               "x": [0.0, 0.0, 1.0], "y": [0.0, 0.6, 0.8]}  # a pair: tied, x comes first

    def embed(texts):
        return torch.tensor([vectors[t] for t in texts])

    bank = cluster_phrases(["x", "a", "b", "c", "y"], embed=embed, threshold=0.5)
    assert [(bank.cluster_name(i), bank.alternatives(i)) for i in range(len(bank))] == [
        ("x", ("x", "y")), ("b", ("a", "b", "c")),
    ]


def test_cluster_command_writes_the_bank_of_the_metadata_phrases(tmp_path, capsys):
    metadata = tmp_path / "train.jsonl"
    metadata.write_text("".join(json.dumps({
        "audio_id": f"clip{number}", "audio_path": "clip.wav", "caption": "sounds",
        "phrases": [{"phrase": phrase, "segments": [[0.0, 1.0]]} for phrase in REAL_PHRASES[number::20]],
    }) + "\n" for number in range(20)))
    assert data_cli(["cluster", "--metadata", str(metadata), "--out", str(tmp_path / "bank.jsonl")]) == 0
    bank = PhraseBank.read(tmp_path / "bank.jsonl")
    assert {normalise_phrase(p) for p in REAL_PHRASES} <= {
        normalise_phrase(a) for number in range(len(bank)) for a in bank.alternatives(number)
    }
    assert f"clusters of {len(REAL_PHRASES)} phrases" in capsys.readouterr().out


def test_cluster_command_names_a_bad_metadata_line(tmp_path, capsys):
    metadata = tmp_path / "train.jsonl"
    metadata.write_text(json.dumps({"audio_id": "a", "audio_path": "a.wav", "caption": "dog"}) + "\n"
                        + '{"audio_id": "b", "audio_path": "b.wav", "caption": "cat", "phrases": [{"phrase": 3}]}\n')
    assert data_cli(["cluster", "--metadata", str(metadata), "--out", str(tmp_path / "bank.jsonl")]) == 1
    assert f"{metadata}:2: " in capsys.readouterr().err
    assert not (tmp_path / "bank.jsonl").exists()
