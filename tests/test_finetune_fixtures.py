"""Tiny labelled datasets for the fine-tuning tests, built by the real shard writer from cubes made in code.

Scenes are small hyperspectral-like cubes whose class fields carry distinct spectra (so a model can
learn them in a few steps), with sparse labels (0 = unlabelled) as in Indian Pines. No tests here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gfm.shards import BuildOptions, DateSpec, FileSpec, SceneSpec, build

BANDS = 6
WAVELENGTHS = [450.0, 550.0, 650.0, 850.0, 1600.0, 2200.0]
CLASS_NAMES = ["water", "forest", "crop"]
ENCODER = {"name": "less_vit_tiny", "kwargs": {"depth": 2, "patch_size": 4}}


def field_map(h: int, w: int, seed: int = 0) -> np.ndarray:
    """``[h, w]`` class fields 1..3 in vertical stripes of blocks, 0 (unlabelled) on a sparse grid of gaps."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), dtype=np.int16)
    for r0 in range(0, h, 8):
        for c0 in range(0, w, 8):
            labels[r0 : r0 + 8, c0 : c0 + 8] = 1 + ((r0 // 8) * 7 + (c0 // 8) * 3 + rng.integers(0, 2)) % 3
    labels[rng.random((h, w)) < 0.3] = 0  # sparse: a third of the pixels unlabelled
    return labels


def cube_for(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """``[h, w, BANDS]`` uint16 reflectance whose spectrum depends on the class (0 → mixed soil)."""
    rng = np.random.default_rng(seed + 1)
    spectra = np.array([[900, 800, 500, 200, 100, 80],     # soil / unlabelled
                        [300, 250, 150, 60, 30, 20],       # water
                        [400, 700, 400, 3000, 1500, 700],  # forest
                        [500, 900, 800, 2200, 2500, 1600]], dtype=np.float64)  # crop
    cube = spectra[labels.clip(0, 3)] + rng.normal(0, 60, labels.shape + (BANDS,))
    return cube.clip(1, 60000).astype(np.uint16)


def write_scene(root: Path, name: str, h: int, w: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """A cube, its label array and the wavelength list on disk."""
    root.mkdir(parents=True, exist_ok=True)
    labels = field_map(h, w, seed)
    cube, lab, wl = root / f"{name}.npy", root / f"{name}_gt.npy", root / "wavelengths.txt"
    np.save(cube, cube_for(labels, seed))
    np.save(lab, labels)
    wl.write_text("\n".join(str(x) for x in WAVELENGTHS) + "\n")
    return cube, lab, wl


def build_labelled(out: Path, scenes: list[dict[str, Any]], tile: int, stride: int | None = None) -> Path:
    """Shards of ``scenes`` (``{name, h, w, seed, label: bool, label_class: int | None}``) built by gfm.shards."""
    specs = []
    for s in scenes:
        cube, lab, wl = write_scene(out.parent / "raw", s["name"], s["h"], s["w"], s.get("seed", 0))
        files = [FileSpec(str(cube), sensor="toy_hsi", wavelengths=str(wl))]
        specs.append(SceneSpec(
            s["name"], [DateSpec("2020-06-01", files)], label=str(lab) if s.get("label", True) else None,
            label_class=s.get("label_class"), gsd=10.0,
        ))
    build(specs, BuildOptions(out=str(out), tile=tile, stride=stride, min_valid=0.0, progress=False))
    return out


def pixel_dataset(tmp: Path) -> Path:
    """One 48 x 48 scene in 16 px tiles, sparse labels 0..3 (0 unlabelled)."""
    return build_labelled(tmp / "pixel", [{"name": "toy", "h": 48, "w": 48}], tile=16)


def scene_dataset(tmp: Path) -> Path:
    """Twelve 8 x 8 scenes, one class each (label.cls), no label rasters."""
    scenes = [{"name": f"s{i}", "h": 8, "w": 8, "seed": i, "label": False, "label_class": 1 + i % 3} for i in range(12)]
    return build_labelled(tmp / "scene", scenes, tile=8)


def finetune_overrides(shards: Path, run_dir: Path, task: str, method: str, steps: int = 6) -> list[str]:
    """Config overrides of a short run on a fixture with the tiny encoder."""
    return [
        f"data.shards={shards}", f"data.task={task}", f"run_dir={run_dir}", f"method.name={method}",
        f"steps={steps}", "schedule.warmup_steps=1", "data.batch_size=8", "data.eval_batch_size=64",
        "data.labels.ignore=[0]", f"data.labels.names={CLASS_NAMES}", "logging.progress=false",
        "logging.peak_flops=1e9", f"encoder.name={ENCODER['name']}", f"encoder.kwargs={ENCODER['kwargs']}",
        "split.block=16", "split.fractions=[0.5,0.0,0.5]", "split.per_class=10",
    ]
