"""Training data: metadata -> phrase clusters -> sampler -> decoded audio -> `Batch`.

metadata.py     training metadata (JSON lines) records, validated with file:line messages
clip_table.py   the metadata of one file as flat arrays, converted once and mapped by every process
mapped_cache.py caches of arrays beside their input files: keyed by the file, written once per node
phrase_bank.py  clusters of synonymous phrases; automatic clustering
labels.py       frame labels on the encoder's frame grid (0.16 s for EAT)
training_set.py the training set, cluster-based phrase sampling, the Batch builder
sampler.py      distributed heterogeneous batch sampler: which clips form each batch (resumable)
loader.py       `build_train_loader`: DataLoader and DALI input paths
shards.py       WebDataset shards: packing, and random access through the index files' offsets
worker_pool.py  maps over worker processes, results in input order (validate and pack)

Submodules are imported directly (`from finelap.data.loader import
build_train_loader`) so that importing `finelap.data.batch` stays light.
"""
