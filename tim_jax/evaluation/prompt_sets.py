"""Text-to-image benchmark prompt sets and the sample folders their evaluators read.

Sets (prompt files: ``tim_jax/evaluation/prompts/``, origins and licences in ``SOURCE.md`` there):

  * ``geneval`` -- GenEval's 553 ``evaluation_metadata.jsonl`` entries, 4 samples each. Layout
    (GenEval's ``evaluation/evaluate_images.py`` reads digit-named folders and ``\\d+.png``)::

        OUT/<index:05d>/metadata.jsonl        the prompt's JSON entry (one line)
        OUT/<index:05d>/samples/<k:05d>.png   k = 0..3
        OUT/<index:05d>/grid.png              2 x 2 grid (as the official sampler; not read)

  * ``dpg`` -- DPG-Bench's 1065 prompts (ELLA's ``dpg_bench/prompts/<key>.txt``), 4 samples each
    in one 2 x 2 grid (``compute_dpg_bench.py --pic-num 4`` crops the quadrants)::

        OUT/<key>.png                          (2H, 2W): sample k at row k // 2, column k % 2

  * ``mjhq`` -- MJHQ-30K's ``meta_data.json`` (``{key: {"prompt", "category"}}``; not shipped:
    download it, see docs/evaluation.md), one sample each, JPEG as the official sampler (PIL's
    default quality 75; the FID / CLIP scripts glob ``*.jpg`` recursively)::

        OUT/<category>/<key>.jpg

Generation goes through :class:`tim_jax.inference.TiMPipeline`: prompts are taken in fixed groups
of ``prompts_per_call`` (the caption features of a call are cut to its longest prompt, as the
official samplers cut per batch), each prompt repeated ``samples_per_prompt`` times; group ``g``
of a run with ``seed`` uses the pipeline seed ``(seed * 1000003 + g) mod 2**32``, so its images
depend on (seed, group size, settings) only, not on the device or process count, nor on resuming.
Every file is written to a temporary name and renamed; a group whose files all exist is skipped.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["PromptItem", "SETS", "SAMPLES_PER_PROMPT", "PROMPTS_DIR", "load_prompt_set",
           "item_files", "item_done", "write_item", "group_seed", "generate_prompt_set"]

SETS = ("geneval", "dpg", "mjhq")
SAMPLES_PER_PROMPT = {"geneval": 4, "dpg": 4, "mjhq": 1}
PROMPTS_DIR = Path(__file__).parent / "prompts"
DEFAULT_FILES = {"geneval": PROMPTS_DIR / "geneval_metadata.jsonl",
                 "dpg": PROMPTS_DIR / "dpg_bench_prompts.jsonl", "mjhq": None}
JPEG_QUALITY = 75  # PIL's default, which the official MJHQ sampler used


@dataclasses.dataclass(frozen=True)
class PromptItem:
    """One prompt: ``key`` names its files, ``metadata`` is GenEval's JSON entry (else None),
    ``category`` MJHQ's category (else None)."""

    key: str
    prompt: str
    metadata: dict | None = None
    category: str | None = None


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e})") from None
    return out


def load_prompt_set(name: str, path=None) -> list[PromptItem]:
    """The prompts of set ``name`` from ``path`` (default: the shipped file; MJHQ needs one).

    geneval: a JSONL of entries with "prompt" (keys 00000, 00001, ... in file order).
    dpg: the shipped JSONL ({"key", "prompt"}) or ELLA's folder of ``<key>.txt`` (sorted by key).
    mjhq: ``meta_data.json`` ({key: {"prompt", "category"}}, file order)."""
    if name not in SETS:
        raise ValueError(f"unknown prompt set {name!r}; sets: {list(SETS)}")
    path = DEFAULT_FILES[name] if path is None else Path(path)
    if path is None:
        raise ValueError("the MJHQ-30K prompts are not shipped: give --prompts meta_data.json "
                         "(see docs/evaluation.md for the download command)")
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if name == "geneval":
        rows = _read_jsonl(path)
        bad = [i for i, r in enumerate(rows) if not isinstance(r.get("prompt"), str)]
        if bad:
            raise ValueError(f"{path}: entries {bad[:5]} have no 'prompt' string")
        return [PromptItem(f"{i:05d}", r["prompt"], metadata=r) for i, r in enumerate(rows)]
    if name == "dpg":
        if path.is_dir():
            files = sorted(path.glob("*.txt"), key=lambda p: p.stem)
            items = [PromptItem(p.stem, p.read_text(encoding="utf-8")) for p in files]
        else:
            items = [PromptItem(str(r["key"]), r["prompt"]) for r in _read_jsonl(path)]
        if not items:
            raise ValueError(f"{path}: no DPG-Bench prompts found")
        return items
    meta = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(meta, dict) or not all(
            isinstance(v, dict) and "prompt" in v and "category" in v for v in meta.values()):
        raise ValueError(f"{path}: not MJHQ-30K's meta_data.json ({{key: {{prompt, category}}}})")
    return [PromptItem(str(k), v["prompt"], category=str(v["category"])) for k, v in meta.items()]


def item_files(name: str, item: PromptItem, out_dir, samples: int) -> list[Path]:
    """The files one prompt's samples make (the last one is written last)."""
    out = Path(out_dir)
    if name == "geneval":
        folder = out / item.key
        return ([folder / "samples" / f"{k:05d}.png" for k in range(samples)]
                + [folder / "grid.png", folder / "metadata.jsonl"])
    if name == "dpg":
        return [out / f"{item.key}.png"]
    return [out / str(item.category) / f"{item.key}.jpg"]


def item_done(name: str, item: PromptItem, out_dir, samples: int) -> bool:
    return all(p.is_file() for p in item_files(name, item, out_dir, samples))


def _grid(images: np.ndarray) -> np.ndarray:
    """(4, H, W, 3) -> (2H, 2W, 3): sample k at row k // 2, column k % 2, no padding."""
    n, h, w, c = images.shape
    if n != 4:
        raise ValueError(f"a 2 x 2 grid needs 4 samples, got {n}")
    return images.reshape(2, 2, h, w, c).transpose(0, 2, 1, 3, 4).reshape(2 * h, 2 * w, c)


def _save(path: Path, image: np.ndarray, **kwargs) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    Image.fromarray(image).save(tmp, **kwargs)
    os.replace(tmp, path)


def write_item(name: str, item: PromptItem, images: np.ndarray, out_dir) -> None:
    """Write one prompt's samples (K, H, W, 3) uint8 in the layout of set ``name``."""
    images = np.asarray(images)
    files = item_files(name, item, out_dir, len(images))
    if name == "geneval":
        for k, im in enumerate(images):
            _save(files[k], im)
        if len(images) == 4:
            _save(files[-2], _grid(images))
        else:
            _save(files[-2], np.concatenate(list(images), axis=1))
        tmp = files[-1].with_name(f".metadata.tmp{os.getpid()}")
        tmp.write_text(json.dumps(item.metadata), encoding="utf-8")
        os.replace(tmp, files[-1])
    elif name == "dpg":
        _save(files[0], _grid(images))
    else:
        if len(images) != 1:
            raise ValueError(f"MJHQ takes one sample per prompt, got {len(images)}")
        _save(files[0], images[0], quality=JPEG_QUALITY)


def group_seed(seed: int, group: int) -> int:
    """The pipeline seed of prompt group ``group`` (distinct for every group of one run)."""
    return (int(seed) * 1000003 + int(group)) % 2 ** 32


def generate_prompt_set(pipe, name: str, items: Sequence[PromptItem], out_dir, *,
                        steps: Sequence[int], prompts_per_call: int = 8, seed: int = 0,
                        samples_per_prompt: int | None = None, process_index: int = 0,
                        process_count: int = 1, max_groups: int | None = None,
                        progress: bool = False, **settings) -> dict:
    """Write the samples of ``items`` for every step count into ``out_dir/steps{n}/``.

    ``settings``: the pipeline's sampler keywords (cfg_scale, cfg_interval, stochasticity, mode,
    height, width, batch_size). Groups are shared round robin between processes. Returns
    ``{"made": groups generated, "complete": whether every group of this process is done}``."""
    k = SAMPLES_PER_PROMPT[name] if samples_per_prompt is None else int(samples_per_prompt)
    if name == "dpg" and k != 4:
        raise ValueError("DPG-Bench takes 4 samples per prompt (one 2 x 2 grid)")
    if name == "mjhq" and k != 1:
        raise ValueError("MJHQ-30K takes 1 sample per prompt")
    if k < 1 or int(prompts_per_call) < 1:
        raise ValueError("samples_per_prompt and prompts_per_call must be >= 1")
    g = int(prompts_per_call)
    groups = [list(items[s:s + g]) for s in range(0, len(items), g)]
    mine = list(range(int(process_index), len(groups), int(process_count)))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine) * len(steps) * g * k, unit="img", desc=name)
    made = 0
    try:
        for n in steps:
            out = Path(out_dir) / f"steps{int(n)}"
            for gi in mine:
                group = groups[gi]
                if all(item_done(name, it, out, k) for it in group):
                    if bar is not None:
                        bar.update(len(group) * k)
                    continue
                if max_groups is not None and made >= max_groups:
                    return {"made": made, "complete": False}
                prompts = [it.prompt for it in group for _ in range(k)]
                res = pipe(prompts=prompts, num_steps=int(n), seed=group_seed(seed, gi),
                           **settings)
                for j, it in enumerate(group):
                    write_item(name, it, res.images[j * k:(j + 1) * k], out)
                made += 1
                if bar is not None:
                    bar.update(len(group) * k)
    finally:
        if bar is not None:
            bar.close()
    return {"made": made, "complete": True}
