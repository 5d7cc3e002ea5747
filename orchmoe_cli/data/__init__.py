"""Multi-task instruction data: Super-NaturalInstructions task files or a table of your own.

- ``data_config``: the recipe's ``data`` section (``DataConfig``, ``ColumnMap``).
- ``sources``: which reader a ``data.source`` needs (``resolve``).
- ``sni``: find SNI's task and split files and pick each split's instances (``resolve_source``, ``read_split``).
- ``sni_task``: read and validate one SNI task file (``read_task``, ``SNITask``, ``Instance``, ``Example``).
- ``tables``: JSONL / JSON / CSV / TSV / Parquet files or a hub dataset through ``datasets`` (``TableSource``).
- ``encoding``: the Tk-Instruct prompt format, or a template of your own (``encode_prompts``).
- ``dataset_cache``: encode once and cache by content hash (``prepare``, ``load_prepared``).
- ``rows``: prepared rows by task, read batch by batch (``TaskRows``).
- ``collate``: training and generation batches (``TrainCollator``, ``GenerationCollator``).

Nothing is re-exported here, so that reading and validating data does not import torch or datasets.
"""
