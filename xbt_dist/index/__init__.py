"""The old-gallery ANN index: FAISS indexes (flat inner product, IVF-PQ, HNSW) of the gallery's
embeddings per view (old, new, xbt), built from embedding shard sets (`xbt index build`), evaluated
on the six retrieval cases next to exact search (`xbt index eval`), and queried by `xbt serve`.
"""
