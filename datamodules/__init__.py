"""Data: webdataset shards per task, sample validation, aspect buckets and token-budget batching
(``webdata``), the ``LightningDataModule`` (``datamodule``) and ShapesWorld (``shapes``, ``shapes_world``)."""

from datamodules.datamodule import TaskData, WallarooDataModule

__all__ = ["TaskData", "WallarooDataModule"]
