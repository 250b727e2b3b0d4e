"""recstack.columnio: columnar files (Parquet, ORC, Arrow IPC) in, device batches out.

* :class:`ColumnReader` reads files, directories, globs or ``s3://``/``gs://``/``hdfs://``
  URIs with multi-threaded decoding into ``dict[str, Tensor | JaggedTensor]`` batches, sharded
  by rank, shuffled per epoch (in windows, or exactly over the whole epoch with
  ``shuffle="epoch"``), with exact resume from :meth:`ColumnReader.state_dict`. It is a
  ``torch.utils.data.IterableDataset``: ``DataLoader(reader, batch_size=None)`` works, and
  torchdata's ``StatefulDataLoader`` resumes it.
* :class:`StreamingReader` follows a directory for online learning, in windows.
* :class:`ReadOptions`: what both readers share (columns, batch size, sharding, threads...),
  checked once; give it as ``options=`` or as keyword arguments.
* :func:`to_device` copies batch k+1 to the GPU on a side stream while batch k trains.
* :func:`write_parquet` and :func:`write_synthetic_ctr` write data (atomically).
"""

from recstack.columnio.batching import Batch
from recstack.columnio.columns import MISSING, Column
from recstack.columnio.device import (
    DevicePrefetcher,
    batch_to,
    pin_batch,
    record_batch_stream,
    to_device,
)
from recstack.columnio.errors import ColumnIOError, ReadStats, ShuffleWarning
from recstack.columnio.files import FORMATS, FileRef
from recstack.columnio.formats import FileMeta, inspect_file, read_unit
from recstack.columnio.options import ReadOptions
from recstack.columnio.paths import infer_format, resolve_files
from recstack.columnio.reader import ColumnReader
from recstack.columnio.streaming import EndOfWindow, StreamingReader
from recstack.columnio.synthetic import (
    SyntheticCTRConfig,
    SyntheticCTRInfo,
    best_auc,
    iter_synthetic_ctr,
    roc_auc,
    synthetic_ctr_table,
    write_synthetic_ctr,
)
from recstack.columnio.writer import batch_to_table, write_parquet

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "MISSING",
    "Batch",
    "Column",
    "ColumnIOError",
    "ColumnReader",
    "DevicePrefetcher",
    "EndOfWindow",
    "FileMeta",
    "FileRef",
    "ReadOptions",
    "ReadStats",
    "ShuffleWarning",
    "StreamingReader",
    "SyntheticCTRConfig",
    "SyntheticCTRInfo",
    "__version__",
    "batch_to",
    "batch_to_table",
    "best_auc",
    "infer_format",
    "inspect_file",
    "iter_synthetic_ctr",
    "pin_batch",
    "read_unit",
    "record_batch_stream",
    "resolve_files",
    "roc_auc",
    "synthetic_ctr_table",
    "to_device",
    "write_parquet",
    "write_synthetic_ctr",
]
