"""Inputs of :mod:`tim_jax.data.prepare`: an image folder (ImageNet train layout, or the images
named by a captions JSONL) or a TFDS image dataset read with ``tfds.data_source`` (no
TensorFlow).

Every input has a fixed global ``index`` (its position in the listing: sorted class folders,
then files sorted within each, the official ImageFolder order; the JSONL's line order; the TFDS
split's order), which decides its shard and, for the SD-VAE, its noise key. ``load(index)``
returns ``(source, key, label, caption)`` where ``source`` is what
:func:`tim_jax.data.prepare_images.open_rgb` accepts; it may raise on bad input (the caller skips
the record).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from tim_jax.data.prepare_images import IMAGE_EXTENSIONS


class InputError(ValueError):
    """Bad input arguments (reported before any work; the CLI exits with status 2)."""


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class FolderInputs:
    """Images under ``root``: one sub-folder per class (class names sorted; label = position),
    files found recursively within each class folder; or, with ``captions``, exactly the images
    a JSONL of ``{"image": relpath, "caption": str}`` lines names (label -1)."""

    def __init__(self, root: str, captions: str | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"--images {root}: not a directory")
        if captions:
            self._from_captions(captions)
        else:
            self._from_class_folders()
        if not self.entries:
            what = f"listed in {captions}" if captions else (
                f"with extensions {', '.join(IMAGE_EXTENSIONS)} in class sub-folders of {root}")
            raise InputError(f"--images {root}: no images {what}")

    def _from_class_folders(self) -> None:
        self.class_names = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        if not self.class_names:
            raise InputError(f"--images {self.root}: no class sub-folders (expected the ImageNet "
                             "train layout root/<class>/<image>; use --captions for a flat set)")
        self.entries: list[tuple[str, int, str | None]] = []
        for label, name in enumerate(self.class_names):
            found = []
            for dirpath, dirnames, filenames in os.walk(self.root / name, followlinks=True):
                dirnames.sort()
                rel = Path(dirpath).relative_to(self.root)
                found.extend((rel / f).as_posix() for f in sorted(filenames) if _is_image(f))
            self.entries.extend((key, label, None) for key in found)

    def _from_captions(self, captions: str) -> None:
        self.class_names = []
        self.entries = []
        seen: set[str] = set()
        try:
            lines = Path(captions).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise InputError(f"--captions {captions}: {exc}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"--captions {captions}:{number}: not JSON ({exc})") from None
            if (not isinstance(item, dict) or not isinstance(item.get("image"), str)
                    or not isinstance(item.get("caption"), str)):
                raise InputError(f"--captions {captions}:{number}: expected "
                                 '{"image": relative path, "caption": text}')
            key = Path(item["image"]).as_posix()
            if key.startswith("/") or ".." in Path(key).parts:
                raise InputError(f"--captions {captions}:{number}: image path {key!r} must be "
                                 "relative to --images and stay inside it")
            if key in seen:
                raise InputError(f"--captions {captions}:{number}: image {key!r} listed twice "
                                 "(one line per image)")
            seen.add(key)
            self.entries.append((key, -1, item["caption"]))

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int):
        key, label, caption = self.entries[index]
        path = self.root / key
        if not path.is_file():
            raise FileNotFoundError(f"missing file {path}")
        return path, key, label, caption

    def fallback_key(self, index: int) -> str:
        return self.entries[index][0]

    def fingerprint(self) -> str:
        """sha256 of the listing (keys, labels, captions): shards depend on it."""
        h = hashlib.sha256()
        for key, label, caption in self.entries:
            h.update(json.dumps([key, label, caption]).encode("utf-8") + b"\n")
        return h.hexdigest()

    def describe(self) -> dict:
        return {"kind": "images", "root": str(self.root.resolve())}


_TFDS_KEY_FEATURES = ("file_name", "filename", "image/filename", "image_id", "id")


class TfdsInputs:
    """A TFDS image dataset split through ``tfds.data_source`` (the dataset must have been
    prepared in ``array_record`` format; image features decode with PIL, no TensorFlow)."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None):
        try:
            import tensorflow_datasets as tfds
        except ImportError as exc:  # pragma: no cover - a dependency of tim_jax
            raise InputError(f"--tfds needs tensorflow-datasets: {exc}") from None
        self.name, self.split, self.data_dir = name, split, data_dir
        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir)
        except ModuleNotFoundError as exc:
            raise InputError(f"--tfds {name}: tfds.data_source needs a module that is not "
                             f"installed ({exc}); TensorFlow is not used by tim_jax") from None
        except Exception as exc:  # noqa: BLE001 - tfds raises many kinds; report them plainly
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise InputError(f"--tfds {name} (split {split!r}, data dir {data_dir}): "
                             f"tfds.data_source failed: {type(exc).__name__}: {first} (it needs "
                             "the dataset prepared in array_record format under --data-dir)"
                             ) from None
        features = self.source.dataset_info.features
        images = [k for k, f in features.items() if type(f).__name__ == "Image"]
        if not images:
            raise InputError(f"--tfds {name}: no Image feature (features: {list(features)})")
        self.image_feature = "image" if "image" in images else images[0]
        label = features["label"] if "label" in features else None
        self.label_feature = "label" if label is not None else None
        self.class_names = list(getattr(label, "names", None) or [])
        self.key_feature = next((k for k in _TFDS_KEY_FEATURES if k in features), None)
        if len(self.source) == 0:
            raise InputError(f"--tfds {name}: split {split!r} is empty")

    def __len__(self) -> int:
        return len(self.source)

    def fallback_key(self, index: int) -> str:
        return f"{self.name}/{self.split}/{index}"

    def load(self, index: int):
        try:
            example = self.source[index]
        except ModuleNotFoundError as exc:
            raise RuntimeError(f"decoding needs a missing module ({exc}): this dataset's "
                               "features cannot be read without TensorFlow") from None
        image = np.asarray(example[self.image_feature])
        key = self.fallback_key(index)
        if self.key_feature is not None:
            value = example[self.key_feature]
            value = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            key = value or key
        label = int(example[self.label_feature]) if self.label_feature else -1
        return image, key, label, None

    def fingerprint(self) -> str:
        info = self.source.dataset_info
        text = json.dumps([self.name, self.split, str(info.version), len(self)])
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        return {"kind": "tfds", "name": self.name, "split": self.split,
                "data_dir": self.data_dir, "version": str(self.source.dataset_info.version)}
