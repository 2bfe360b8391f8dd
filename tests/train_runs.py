"""Helpers for the tests that run the train CLI: a fault injected from the test (never from the
training loop) and readers of what a run wrote (metrics.jsonl, a checkpoint's train state)."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from tim_jax.training import checkpointing


def pause_after_first_save(marker: str = "checkpoint committed: step", sleep_s: int = 600) -> str:
    """A ``python -c`` program: the train CLI (its arguments from the command line) with
    ``Checkpointer.save`` wrapped so that the first periodic save waits for its commit, prints
    ``"<marker> <step>"`` and sleeps ``sleep_s`` seconds, leaving time for the test's SIGKILL."""
    return f"""
import sys, time
from tim_jax.training import checkpointing, cli
_save = checkpointing.Checkpointer.save
def save(self, step, *args, **kwargs):
    started = _save(self, step, *args, **kwargs)
    if started:
        self.wait()
        print(f"{marker} {{step}}", flush=True)
        time.sleep({int(sleep_s)})
    return started
checkpointing.Checkpointer.save = save
sys.exit(cli.main(["tim_jax.train", *sys.argv[1:]]))
"""


def metrics_records(workdir) -> list[dict]:
    """The run's ``metrics.jsonl``, one dict per logged step."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def saved_state(workdir, step):
    """The train state saved at ``step``, every leaf a numpy array (no model or mesh needed)."""
    path = os.path.join(workdir, checkpointing.CHECKPOINT_SUBDIR, str(step), "state")
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path).item_metadata
    tree = getattr(meta, "tree", meta)
    restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def flat_numpy(tree) -> dict:
    """``{key path: numpy leaf}`` of a pytree."""
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
