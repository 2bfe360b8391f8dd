"""Interoperation with the official PyTorch TiM and the reference libraries.

Checkpoints (``python -m tim_jax.convert``, :mod:`.convert`): :mod:`.official_io` reads official
files, :mod:`.official_arch` / :mod:`.official_check` know and check the architectures,
:mod:`.official_keys` maps keys and layouts, :mod:`.converted_dir` holds the weights directories.
Parity (``python -m tim_jax.parity``, :mod:`.parity`): :mod:`.parity_report` (records, metrics),
:mod:`.parity_network`, :mod:`.parity_formulas`, :mod:`.parity_encoders`,
:mod:`.parity_references` (one per fixture kind), :mod:`.parity_live` (against the official
torch network). Torch side: :mod:`.torch_shims` (no tim_jax/JAX imports) and
:mod:`.torch_driver` (the torch half of ``python -m tim_jax.bench official``).
"""
