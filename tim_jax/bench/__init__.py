"""Speed benchmarks: the train step alone, and side by side with the official PyTorch step."""
