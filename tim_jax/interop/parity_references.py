"""Parity of reference outputs stored without a ``config.json`` of their own: the torch resizes,
DINOv2 at other input sizes, and pytorch-fid's FID Inception v3.

Each kind is recognised by its files and checked with the tim_jax function it covers (inputs
NCHW in the fixture, NHWC in tim_jax). The MAKE.md of each folder says how it was made:

=====================  =========================================  ==============================
folder holds           kind (weights from)                        checks
=====================  =========================================  ==============================
``resize.npz``         torch ``F.interpolate`` resizes            bicubic, bilinear align_corners
``io.npz`` with        DINOv2, other input sizes (the weights     position embeddings, outputs,
``repa/features``      of the sibling folder without ``_interp``)  REPA patch features
``io.npz`` with        pytorch-fid FID Inception v3 (weights      pool3, logits, its resizes
``state_dict_keys``    rebuilt by ``../_make/make_fid_inception.py``)
=====================  =========================================  ==============================
"""
from __future__ import annotations

import ast
import importlib.util
import pathlib
from typing import Callable

import jax.numpy as jnp
import numpy as np

from tim_jax.interop.parity_report import (
    TOLERANCES,
    CheckResult,
    ParityInputError,
    compare,
    load_npz,
    nchw_to_nhwc,
    need,
    nhwc_to_nchw,
)

__all__ = ["reference_kind", "check_resize", "check_dinov2_interp", "check_fid_inception"]


def _cases(data: dict, prefix: str) -> list[str]:
    """Names ``NAME`` of the ``{prefix}NAME/x`` arrays."""
    return sorted({k[len(prefix):].split("/")[0] for k in data if k.startswith(prefix)})


def _resize_results(directory, data: dict, path, prefix: str, fn: Callable, label: str) -> list:
    results = []
    for name in _cases(data, prefix):
        x, ref = need(data, f"{prefix}{name}/x", path), need(data, f"{prefix}{name}/y", path)
        ours = nhwc_to_nchw(np.asarray(fn(jnp.asarray(nchw_to_nhwc(x)), ref.shape[-2:])))
        results.append(compare(str(directory), f"{label}/{name}", ours, ref, TOLERANCES["resize"],
                               "float32"))
    return results


def check_resize(directory: str | pathlib.Path) -> list[CheckResult]:
    """``resize.npz``: ``MODE/NAME/x`` -> ``MODE/NAME/y`` (NCHW) for MODE ``bicubic``
    (align_corners=False) and ``bilinear_ac`` (align_corners=True)."""
    from tim_jax.encoders.resize import resize_bicubic, resize_bilinear_align_corners

    path = pathlib.Path(directory) / "resize.npz"
    data = load_npz(path)
    modes = {"bicubic": resize_bicubic, "bilinear_ac": resize_bilinear_align_corners}
    if unknown := {k.split("/")[0] for k in data} - set(modes):
        raise ParityInputError(f"{path}: unknown resize modes {sorted(unknown)}; known {sorted(modes)}")
    results = []
    for mode, fn in modes.items():
        results += _resize_results(directory, data, path, f"{mode}/", fn, f"resize/{mode}")
    return results


def check_dinov2_interp(directory: str | pathlib.Path) -> list[CheckResult]:
    """DINOv2 at input sizes whose patch grid differs from the stored position grid: for each
    ``hHwW/`` case the interpolated position embeddings and ``last_hidden_state``, and the REPA
    patch features of ``repa/``. Weights: the sibling folder named without ``_interp``."""
    from flax import nnx

    from tim_jax.encoders.dinov2 import PARITY_TOLERANCE, Dinov2Encoder

    directory = pathlib.Path(directory)
    path = directory / "io.npz"
    weights = directory.parent / directory.name.removesuffix("_interp")
    if weights == directory or not (weights / "config.json").is_file():
        raise ParityInputError(f"{directory}: DINOv2 interpolation outputs need the weights folder "
                               f"{weights} (config.json + model.safetensors) beside it")
    data = load_npz(path)
    model = Dinov2Encoder.from_pretrained(weights)
    d, results = str(directory), []
    for case in [c for c in _cases(data, "") if c != "repa"]:
        x = need(data, f"{case}/pixel_values", path)
        h, w = x.shape[-2:]
        patch = int(model.config.patch_size)
        pos = np.asarray(model.position_embeddings(h // patch, w // patch))
        results.append(compare(d, f"dinov2/{case}/position_embeddings", pos,
                               need(data, f"{case}/position_embeddings", path)[0], PARITY_TOLERANCE))
        out = nnx.jit(lambda m, v: m(v))(model, jnp.asarray(nchw_to_nhwc(x)))
        results.append(compare(d, f"dinov2/{case}/last_hidden_state", out,
                               need(data, f"{case}/last_hidden_state", path), PARITY_TOLERANCE))
    if "repa/features" in data:
        size = int(need(data, "repa/size", path))
        feats = nnx.jit(lambda m, v: m.patch_features(v, size=size))(
            model, jnp.asarray(nchw_to_nhwc(need(data, "repa/images", path))))
        results.append(compare(d, "dinov2/repa/features", feats, data["repa/features"],
                               PARITY_TOLERANCE))
    return results


def _load_recipe(path: pathlib.Path):
    if not path.is_file():
        raise ParityInputError(f"the weights recipe {path} is missing (the fixture stores no weights)")
    spec = importlib.util.spec_from_file_location("tim_jax_fid_weight_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_fid_inception(directory: str | pathlib.Path) -> list[CheckResult]:
    """pytorch-fid's FID Inception v3 with seeded random weights: pool3 features and logits of
    ``images``, and the bilinear resizes ``resize/NAME/x -> y``. The weights are rebuilt from
    the names/shapes in ``io.npz`` by ``make_weights`` of ``../_make/make_fid_inception.py``."""
    from tim_jax.evaluation import inception

    directory = pathlib.Path(directory)
    path = directory / "io.npz"
    data = load_npz(path)
    shapes = {str(k): tuple(ast.literal_eval(str(s))) for k, s in
              zip(need(data, "state_dict_keys", path), need(data, "state_dict_shapes", path))}
    recipe = _load_recipe(directory.parent / "_make" / "make_fid_inception.py")
    model = inception.from_state_dict(recipe.make_weights(shapes))
    pool, logits = inception.extract(model, nchw_to_nhwc(need(data, "images", path)))
    d, tol = str(directory), TOLERANCES["encoder"]
    results = [compare(d, "fid_inception/pool", pool, need(data, "pool", path), tol, "float32"),
               compare(d, "fid_inception/logits", logits, need(data, "logits", path), tol, "float32")]
    return results + _resize_results(directory, data, path, "resize/", inception.resize_bilinear,
                                      "fid_inception/resize")


def reference_kind(directory: str | pathlib.Path) -> Callable[[pathlib.Path], list] | None:
    """The check of a folder without ``config.json`` holding reference outputs, or None."""
    directory = pathlib.Path(directory)
    if (directory / "resize.npz").is_file():
        return check_resize
    if not (directory / "io.npz").is_file():
        return None
    keys = set(load_npz(directory / "io.npz"))
    if "state_dict_keys" in keys:
        return check_fid_inception
    if "repa/features" in keys or any(k.endswith("/position_embeddings") for k in keys):
        return check_dinov2_interp
    return None
