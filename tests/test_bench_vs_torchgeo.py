"""``gfm bench torchgeo`` without torchgeo: the prepared inputs, and the child process's contract.

The inputs are made by code: a tiny Sentinel-2-like scene (two 20 m bands, one 60 m band, GeoTIFFs named
``s2_<band>.jp2`` as in ../shared/data). The child runs under this interpreter, which has no torchgeo:
once as it is (it must say so, and the parent must refuse or skip), once with a stand-in ``torchgeo``
package on PYTHONPATH that reads the same windows with rasterio, to exercise the JSON lines both ways.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from bench.vs_torchgeo import (
    TorchgeoProcess,
    TorchgeoUnavailable,
    _complete_or_absent,
    jp2_copies,
    main,
    stack_geotiff,
)

sys.path.insert(0, os.path.dirname(__file__))
from helpers_rasters import jp2_available, write_raster  # noqa: E402

CRS = "EPSG:32618"
X0, Y0 = 435_720.0, 4_179_460.0
BANDS = ("B01", "B05", "B8A")  # 60 m, 20 m, 20 m: the finest (B05) lends the grid
B01_VALUE = 1234
HAS_TORCHGEO = importlib.util.find_spec("torchgeo") is not None
needs_no_torchgeo = pytest.mark.skipif(HAS_TORCHGEO, reason="torchgeo is installed here: nothing to refuse")


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], dict[str, np.ndarray]]:
    """24 x 24 px at 20 m (B05, B8A) and 8 x 8 px at 60 m (B01, constant) on one extent."""
    root = tmp_path_factory.mktemp("s2")
    rng = np.random.default_rng(0)
    arrays = {"B01": np.full((8, 8), B01_VALUE, np.uint16),
              "B05": rng.integers(1, 5000, (24, 24), dtype=np.uint16),
              "B8A": rng.integers(1, 5000, (24, 24), dtype=np.uint16)}
    files = [write_raster(root / f"s2_{b}.jp2", a, Affine(20.0 * (24 // a.shape[0]), 0, X0, 0,
                                                           -20.0 * (24 // a.shape[0]), Y0), CRS)
             for b, a in arrays.items()]
    return files, arrays


def test_stacked_geotiff_puts_every_band_on_the_finest_grid(scene, tmp_path: Path) -> None:
    files, arrays = scene
    out = stack_geotiff(files, tmp_path / "stack.tif")
    with rasterio.open(out) as ds:
        assert (ds.count, ds.shape, ds.res, str(ds.crs)) == (3, (24, 24), (20.0, 20.0), CRS)
        assert ds.transform == Affine(20.0, 0, X0, 0, -20.0, Y0)
        assert ds.profile["tiled"] and ds.compression is None and ds.interleaving.name == "pixel"
        assert ds.descriptions == ("s2_B01", "s2_B05", "s2_B8A")
        cube = ds.read()
    np.testing.assert_array_equal(cube[1], arrays["B05"])  # already on the grid: exact pixels
    np.testing.assert_array_equal(cube[2], arrays["B8A"])
    np.testing.assert_array_equal(cube[0], B01_VALUE)  # 60 m, bilinear: a constant stays constant


@pytest.mark.skipif(not jp2_available(), reason="this rasterio's GDAL has no JP2OpenJPEG driver")
def test_jpeg2000_copies_are_lossless_and_georeferenced(scene, tmp_path: Path) -> None:
    files, arrays = scene
    outs = jp2_copies(files, tmp_path / "jp2")
    assert [p.name for p in outs] == [f"s2_{b}.jp2" for b in BANDS]
    for out, src in zip(outs, files):
        with rasterio.open(out) as ds, rasterio.open(src) as ref:
            assert ds.driver == "JP2OpenJPEG"
            assert (ds.crs, ds.transform, ds.shape) == (ref.crs, ref.transform, ref.shape)
            np.testing.assert_array_equal(ds.read(), ref.read())
    assert sorted(os.listdir(tmp_path / "jp2")) == [f"s2_{b}.jp2" for b in BANDS]  # no sidecars


def test_a_prepared_folder_is_complete_or_absent(tmp_path: Path) -> None:
    out = tmp_path / "stacked"
    with pytest.raises(RuntimeError), _complete_or_absent(out) as tmp:
        tmp.mkdir()
        (tmp / "half.tif").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    with _complete_or_absent(out) as tmp:
        tmp.mkdir()
        (tmp / "whole.tif").write_bytes(b"x")
    assert os.listdir(tmp_path) == ["stacked"] and os.listdir(out) == ["whole.tif"]


def _child_args(stacked: Path, jp2_dir: Path, *, workers: str = "0") -> list[str]:
    return ["--stacked", str(stacked), "--jp2-dir", str(jp2_dir), "--bands", ",".join(BANDS), "--res", "20",
            "--size", "8", "--batch-size", "4", "--batches", "2", "--workers", workers]


@needs_no_torchgeo
def test_child_says_why_without_torchgeo(tmp_path: Path) -> None:
    with pytest.raises(TorchgeoUnavailable, match=r"torchgeo"):
        TorchgeoProcess(sys.executable, _child_args(tmp_path / "s.tif", tmp_path))
    with pytest.raises(TorchgeoUnavailable, match=r"No such file"):
        TorchgeoProcess(str(tmp_path / "no-python"), [])


@needs_no_torchgeo
def test_an_explicit_interpreter_without_torchgeo_is_an_error(capsys: pytest.CaptureFixture) -> None:
    from bench.loader import S2

    if not S2.is_dir():
        pytest.skip(f"real data not found at {S2}: the benchmark skips before asking for torchgeo")
    assert main(["--torchgeo-python", sys.executable]) == 2
    assert "--torchgeo-python cannot run the torchgeo rows" in capsys.readouterr().out


# A stand-in for the part of torchgeo 0.8.1 the child uses: RasterDataset (glob, regex with a band group,
# separate_files, res, an lru_cache'd opener), RandomGeoSampler (slices in CRS units), stack_samples. It
# prints to stdout, as torchgeo's res setter does, to check that only JSON reaches the parent.
STAND_IN = {
    "__init__.py": '__version__ = "0.0-stand-in"\n',
    "datasets.py": '''
        import functools, glob, os, re
        import numpy as np, rasterio, torch
        from rasterio.enums import Resampling
        from rasterio.windows import from_bounds

        class RasterDataset:
            filename_glob, filename_regex, separate_files, all_bands = "*", ".*", False, ()

            def __init__(self, paths, crs=None, res=None, bands=None, transforms=None, cache=True):
                self.files = sorted(glob.glob(os.path.join(paths, self.filename_glob)))
                assert self.files, (paths, self.filename_glob)
                self.bands, self.res = bands or self.all_bands, (res, res)
                with rasterio.open(self.files[0]) as ds:
                    self.bounds = tuple(ds.bounds)
                print("stand-in torchgeo writes to stdout")

            def __getitem__(self, query):
                x, y, _ = query
                files = self.files
                if self.separate_files:
                    m = re.match(self.filename_regex, os.path.basename(files[0]), re.VERBOSE)
                    files = [os.path.join(os.path.dirname(files[0]), m.string[:m.start("band")] + b
                                          + m.string[m.end("band"):]) for b in self.bands]
                h, w = round((y.stop - y.start) / self.res[1]), round((x.stop - x.start) / self.res[0])
                out = []
                for f in files:
                    ds = self._cached_load_warp_file(f)
                    win = from_bounds(x.start, y.start, x.stop, y.stop, ds.transform)
                    out.append(ds.read(window=win, out_shape=(ds.count, h, w), resampling=Resampling.bilinear))
                return {"image": torch.from_numpy(np.concatenate(out).astype(np.float32))}

            @functools.lru_cache(maxsize=128)
            def _cached_load_warp_file(self, f):
                return rasterio.open(f)

        def stack_samples(samples):
            return {"image": torch.stack([s["image"] for s in samples])}
    ''',
    "samplers.py": '''
        import torch

        class RandomGeoSampler:
            def __init__(self, dataset, size, length=None, generator=None):
                self.ds, self.size, self.length, self.generator = dataset, size, length, generator

            def __len__(self):
                return self.length

            def __iter__(self):
                left, bottom, right, top = self.ds.bounds
                span = self.size * self.ds.res[0]
                for _ in range(self.length):
                    x, y = (torch.rand(2, generator=self.generator) * torch.tensor([right - left - span,
                                                                                    top - bottom - span])).tolist()
                    x0, y0 = left + x // 20 * 20, bottom + y // 20 * 20
                    yield slice(x0, x0 + span), slice(y0, y0 + span), slice(None)
    ''',
}


@needs_no_torchgeo
def test_child_rows_as_json_lines_with_a_stand_in_torchgeo(scene, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    files, _ = scene
    pkg = tmp_path / "site" / "torchgeo"
    pkg.mkdir(parents=True)
    for name, text in STAND_IN.items():
        (pkg / name).write_text(textwrap.dedent(text))
    monkeypatch.setenv("PYTHONPATH", str(pkg.parent))
    stacked = stack_geotiff(files, tmp_path / "stacked" / "s2_stack.tif")
    jp2_dir = tmp_path / "jp2"
    jp2_dir.mkdir()
    for f in files:  # the names the child's separate-files regex must match (GeoTIFF content is fine here)
        (jp2_dir / f.name).write_bytes(f.read_bytes())

    child = TorchgeoProcess(sys.executable, _child_args(stacked, jp2_dir))
    try:
        assert child.info["ok"] and child.info["torchgeo"] == "0.0-stand-in" and isinstance(child.info["jp2"], bool)
        for _ in range(2):  # one request per round, answered in order
            rows = child.measure(0.01, ["stacked", "jp2"])
            assert [(r["source"], r["workers"]) for r in rows] == [("stacked", 0), ("jp2", 0)]
            for r in rows:
                assert r["shape"] == [4, 3, 8, 8] and r["dtype"] == "float32"
                assert r["samples"] % 8 == 0 and r["samples"] >= 8  # whole passes of 2 batches of 4
                assert r["seconds"] >= 0.01 and r["cpu"] >= 0
    finally:
        child.close()
    assert child.proc.returncode == 0
