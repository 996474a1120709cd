"""Data: webdataset shard sets, the training sample stream, embedding shard sets and embedding.

- shards.py: list_shards, shard_sizes, iter_image_text, iter_text (plain iterators)
- stream.py: SampleStream (whole shards per slot, shuffled batches with a global data cursor)
- cursor.py: the cursor (slot plan, positions, relayout); reader.py: seeking, retrying tar reads
- embeddings.py: EmbeddingShardSet reader, write_embedding_shard writer
- embed.py: embed_shards (precompute image_old / text_old / text_new ...), Encoder
"""

from xbt_dist.data.embed import Encoder, embed_shards
from xbt_dist.data.embeddings import EmbeddingShardSet, write_embedding_shard
from xbt_dist.data.shards import (ShardError, iter_image_text, iter_raw_samples, iter_text,
                                  list_shards, shard_sizes)
from xbt_dist.data.stream import DataBudgetExceeded, SampleStream, ShardBatchDataset

__all__ = ["Encoder", "embed_shards", "EmbeddingShardSet", "write_embedding_shard", "ShardError",
           "iter_image_text", "iter_raw_samples", "iter_text", "list_shards", "shard_sizes",
           "DataBudgetExceeded", "SampleStream", "ShardBatchDataset"]
