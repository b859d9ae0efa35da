"""Data: raw rating and preference files → the one example schema, configured in YAML, no code per set. Torch-free.

The package follows the flow of a row: `spec` (a `DatasetSpec` says which raw fields hold the prompt, the
replies, the labels, the subset and the objective) → `files` (rows of JSONL, JSON, Parquet, CSV, each optionally
gzipped, or a `datasets` directory) → `values` (each field converted, errors naming file, line and field) →
`adapters` (the row's examples, `examples`) → `datasets` (whole datasets, canonical files); `splits` puts each
example on a stable side of the train/test split. `polyreward rescore` reads its inputs through here too.
"""

from polyreward.training.data.datasets import canonical_options, dataset_rows, read_canonical, read_dataset
from polyreward.training.data.errors import DataError
from polyreward.training.data.examples import BonExample, Examples, PairExample, RatingExample, conversation
from polyreward.training.data.files import read_records
from polyreward.training.data.spec import DatasetSpec, RatingField, load_specs
from polyreward.training.data.splits import split_of, subsplit
from polyreward.training.data.values import parse_hh

__all__ = [
    "BonExample",
    "DataError",
    "DatasetSpec",
    "Examples",
    "PairExample",
    "RatingExample",
    "RatingField",
    "canonical_options",
    "conversation",
    "dataset_rows",
    "load_specs",
    "parse_hh",
    "read_canonical",
    "read_dataset",
    "read_records",
    "split_of",
    "subsplit",
]
