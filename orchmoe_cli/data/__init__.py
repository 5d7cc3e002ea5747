"""Super-NaturalInstructions data.

- ``sni``: find, read and validate task and split files (``resolve_source``, ``read_split``, ``read_task``).
- ``encoding``: the Tk-Instruct prompt format (``encode_prompts``).
- ``dataset_cache``: encode once and cache by content hash (``prepare``, ``load_prepared``).
- ``collate``: training and generation batches (``TrainCollator``, ``GenerationCollator``).

Nothing is re-exported here, so that reading and validating data does not import torch or datasets.
"""
