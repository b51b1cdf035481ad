"""The gradient index: every training example's compressed gradient, computed once, stored in shards.

* `config.py`: `IndexConfig` (how it is built) and `IndexMetadata` (what its config.json records);
* `builder.py`: `build_index` (resumable, across the processes of an `accelerate` job);
* `reader.py`: `GradientIndex` (a finished index, local or on the Hub, read shard by shard).
"""

from ..compression import COMPRESSIONS
from .builder import build_index
from .config import IndexConfig, IndexMetadata, ShardRecord
from .reader import GradientIndex

__all__ = ["COMPRESSIONS", "GradientIndex", "IndexConfig", "IndexMetadata", "ShardRecord", "build_index"]
