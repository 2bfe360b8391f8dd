"""Input pipelines: synthetic and array sources, Grain iteration, host-to-device batches."""
