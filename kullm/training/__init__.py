"""The training stage: the LightningModule, its loss, callbacks, checkpoints, loggers and run plan."""
