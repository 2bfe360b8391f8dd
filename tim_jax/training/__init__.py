"""Training: the CLI and loop, the sharded pure train step, its state, optimizer, sharding rules, Orbax checkpoints and metrics."""
