import io
import json

import numpy as np
import pytest

from gfm.schema import SCHEMA_VERSION, SchemaError, Tile, decode, encode, make_key
from gfm.sensors import (
    KIND_CODE,
    PRESET_NAMES,
    Band,
    SensorError,
    get_sensor,
    guess_sensor,
    hyperspectral,
    load_sensors_yaml,
    read_wavelengths,
)


def test_presets_cover_the_issue_list():
    for name in ["sentinel2_l1c", "sentinel2_l2a", "landsat5", "landsat7", "landsat8", "landsat9", "hls",
                 "sentinel1_grd", "modis"]:
        assert name in PRESET_NAMES
    assert get_sensor("landsat7").band_names == [f"B{i}" for i in range(1, 9)]
    s2 = get_sensor("sentinel2_l1c").band_names
    assert s2[:3] == ["B01", "B02", "B03"] and "B8A" in s2 and len(s2) == 13
    assert "B10" not in get_sensor("sentinel2_l2a").band_names


def test_sar_and_optical_on_one_scale():
    vv = get_sensor("sentinel1_grd").band("VV")
    vh = get_sensor("sentinel1_grd").band("VH")
    assert 5.5e7 < vv.center_nm < 5.6e7  # C-band 5.405 GHz -> 5.55 cm
    assert vv.kind != vh.kind and vv.center_nm == vh.center_nm
    assert get_sensor("landsat8").band("B10").kind == "thermal"


@pytest.mark.parametrize(
    "sensor,filename,band",
    [
        ("sentinel2_l1c", "T33UUU_20200101T101010_B8A.jp2", "B8A"),
        ("sentinel2_l1c", "T33UUU_20200101T101010_B04.jp2", "B04"),
        ("sentinel2_l2a", "T33UUU_20200101T101010_B04_10m.jp2", "B04"),
        ("sentinel2_l2a", "T33UUU_20200101T101010_SCL_20m.jp2", "SCL"),
        ("landsat8", "LC08_L1TP_042034_20200101_20200113_01_T1_B4.TIF", "B4"),
        ("landsat8", "LC08_L2SP_042034_20200101_20200823_02_T1_SR_B5.TIF", "B5"),
        ("landsat8", "l8_B5.tif", "B5"),
        ("landsat8", "l8_BQA.tif", "BQA"),
        ("sentinel1_grd", "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48_VH.tif", "VH"),
        ("landsat7", "LE07_L1TP_B8.TIF", "B8"),
    ],
)
def test_band_from_filename(sensor, filename, band):
    b = get_sensor(sensor).band_from_filename(filename)
    assert b is not None and b.name == band


def test_band_name_variants_and_errors():
    s2 = get_sensor("sentinel2_l1c")
    assert s2.band("B4").name == "B04" and s2.band("b8a").name == "B8A"
    with pytest.raises(SensorError, match="'B13' is not a band of sensor 'sentinel2_l1c'"):
        s2.band("B13")
    with pytest.raises(SensorError, match="unknown sensor 'sentinel3'"):
        get_sensor("sentinel3")


def test_unit_mistakes_are_errors():
    with pytest.raises(SensorError, match="micrometres"):
        Band("x", "s", 0.665, 0.03)
    with pytest.raises(SensorError, match="micrometres"):
        hyperspectral("h", [0.4, 0.5, 0.6])
    with pytest.raises(SensorError, match="SAR wavelength"):
        Band("vv", "s", 5.55, 0.1, "sar_vv")  # centimetres, not nm
    with pytest.raises(SensorError, match="kind"):
        Band("x", "s", 500, 10, "optical")


def test_hls_l30_and_s30_name_the_same_band_differently():
    assert guess_sensor(["HLS.L30.T33UUU.2020123T101031.v2.0.B05.tif"]) == "hls_l30"
    assert get_sensor("hls_l30").band("B05").center_nm > 800  # NIR in L30
    assert get_sensor("hls").band("B05").center_nm < 720  # red edge in S30
    assert get_sensor("hls").quality_rule("HLS.S30.T33UUU.2020123T101031.v2.0.Fmask.tif") == {"bits": [1, 2, 3]}


def test_guess_sensor():
    assert guess_sensor(["LC08_L1TP_042034_20200101_B4.TIF"]) == "landsat8"
    assert guess_sensor(["S2A_MSIL2A_20200101_T33UUU_B04.jp2"]) == "sentinel2_l2a"
    assert guess_sensor(["random.tif"]) is None


def test_user_sensor_yaml(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text(
        "sensors:\n"
        "  drone_cam:\n"
        "    unit: um\n"
        "    bands:\n"
        "      - {name: blue, center: 0.475, fwhm: 0.032}\n"
        "      - {name: nir, center: 0.842, fwhm: 0.057}\n"
        "  bad_cam:\n"
        "    bands:\n"
        "      - {name: blue, center: 0.475, fwhm: 0.032}\n"
    )
    with pytest.raises(SensorError, match=r"sensors.bad_cam.*micrometres"):
        load_sensors_yaml(y)
    s = get_sensor("drone_cam")
    assert s.band("nir").center_nm == pytest.approx(842.0)


def test_hyperspectral_and_wavelength_file(tmp_path):
    f = tmp_path / "wl.txt"
    f.write_text("# AVIRIS\n400.0, 410\n420\n")
    wl = read_wavelengths(f)
    assert wl == [400.0, 410.0, 420.0]
    with pytest.raises(SensorError, match="3 wavelengths listed, but the cube has 5 bands"):
        read_wavelengths(f, expected=5)
    s = hyperspectral("aviris", [420, 400, 410])  # unsorted is legal
    assert [b.fwhm_nm for b in s.bands] == [10, 10, 10]


def test_default_band_width_is_the_spacing_within_each_spectrometer():
    """Two spectrometers overlapping in wavelength (AVIRIS, as Indian Pines lists it): the list steps back
    where the second starts, and the bands there are as wide as their own spectrometer's spacing, not the
    few tenths of a nm to the other spectrometer's nearest band."""
    wl = [400.0, 410.0, 420.0, 415.3, 425.0, 434.7]
    assert [round(b.fwhm_nm, 6) for b in hyperspectral("h", wl).bands] == [10, 10, 10, 9.7, 9.7, 9.7]
    assert [b.fwhm_nm for b in hyperspectral("h", wl[::-1]).bands] == pytest.approx([9.7, 9.7, 9.7, 10, 10, 10])
    assert [b.fwhm_nm for b in hyperspectral("h", [700.0]).bands] == [10.0]
    assert [b.fwhm_nm for b in hyperspectral("h", [500.0, 500.0, 520.0]).bands] == [20.0, 20.0, 20.0]


def _tile(**kw):
    px = np.arange(2 * 4 * 4, dtype=np.uint16).reshape(2, 4, 4)
    meta = {
        "schema": SCHEMA_VERSION,
        "bands": [
            {"name": "B04", "sensor": "sentinel2_l1c", "center_nm": 664.6, "fwhm_nm": 31.0, "kind": "reflectance",
             "time": "2020-01-01"},
            {"name": "VV", "sensor": "sentinel1_grd", "center_nm": 5.5e7, "fwhm_nm": 1e6, "kind": "sar_vv",
             "time": None},
        ],
        "gsd_m": 10.0, "crs": "EPSG:32633", "transform": [10, 0, 0, 0, -10, 0], "bounds": [0, -40, 40, 0],
    }
    t = Tile(key=make_key("my.scene", 20200101, 0, 4), pixels=px, meta=meta,
             valid=np.ones((4, 4), np.uint8), label=np.zeros((4, 4), np.int16))
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def test_schema_roundtrip():
    t = _tile()
    assert "." not in t.key
    back = decode(encode(t))
    np.testing.assert_array_equal(back.pixels, t.pixels)
    assert back.pixels.dtype == np.uint16 and back.meta == t.meta
    np.testing.assert_array_equal(back.label, t.label)
    cls = decode(encode(_tile(label=7)))
    assert cls.label == 7


def test_schema_rejects_bad_samples():
    s = encode(_tile())
    with pytest.raises(SchemaError, match="pickle"):
        decode({**s, "extra.pyd": b"x"})
    with pytest.raises(SchemaError, match="missing member meta.json"):
        decode({k: v for k, v in s.items() if k != "meta.json"})
    meta = json.loads(s["meta.json"])
    meta["bands"] = meta["bands"][:1]
    with pytest.raises(SchemaError, match="1 bands but pixels.npy has C=2"):
        decode({**s, "meta.json": json.dumps(meta).encode()})
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SchemaError, match="pixels.npy is not a readable"):
        decode({**s, "pixels.npy": buf.getvalue()})
    meta = json.loads(s["meta.json"])
    meta["bands"][0]["kind"] = "optical"
    with pytest.raises(SchemaError, match="kind 'optical' is unknown"):
        decode({**s, "meta.json": json.dumps(meta).encode()})


def test_kind_codes_are_stable():
    assert KIND_CODE["reflectance"] == 0 and KIND_CODE["sar_vv"] == 2


def test_presets_are_the_shipped_yaml_files():
    from importlib import resources

    from gfm.sensors import PRESET_FILES, parse_sensors_yaml

    folder = resources.files("gfm") / "sensor_presets"
    shipped = sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml"))
    assert shipped == sorted(PRESET_FILES)
    names = [s.name for f in PRESET_FILES for s in parse_sensors_yaml((folder / f).read_text(), f)]
    assert tuple(names) == PRESET_NAMES
    l8 = get_sensor("landsat8")
    assert l8.quality is not None and l8.quality.name == "BQA" and l8.quality.kind == "quality"
    assert l8.quality_rule("LC08_L2SP_042034_20200101_20200823_02_T1_QA_PIXEL.TIF") == {"bits": [0, 1, 3, 4]}
    assert l8.quality_rule("l8_BQA.tif") == {"bits": [0]}
    assert get_sensor("sentinel2_l2a").quality_rule("T33UUU_20200101T101010_SCL_20m.jp2") == {
        "values": [0, 1, 3, 8, 9, 10]}


@pytest.mark.parametrize(
    "body,match",
    [
        ("    colour: blue\n    bands: [{name: b, center: 475, fwhm: 32}]\n", r"sensors\.cam: unknown key 'colour'"),
        ("    bands: [{name: b, centre: 475, fwhm: 32}]\n", r"sensors\.cam\.bands\[0\]: unknown key 'centre'"),
        ("    bands: [{name: b, center: 475, fwhm: 32}]\n    invalid_quality: {CLOUD: {vals: [1]}}\n",
         r"invalid_quality\.CLOUD: unknown key 'vals'"),
        ("    bands: [{name: b, center: 475, fwhm: 32}]\n    quality_band: {name: CLOUD}\n",
         r"quality_band: 'CLOUD' has no rule in invalid_quality"),
        ("    bands: [{name: b, center: 475, fwhm: 32}]\n    file_patterns: ['_(?P<bnd>b)$']\n",
         r"file_patterns\[0\]: .* has no named group"),
        ("    bands: [{name: b, center: 475, fwhm: 32}]\n    invalid_quality: {CLOUD: {bits: [64]}}\n",
         r"bits: 64 is not an integer in 0\.\.63"),
        ("    bands: [{name: b, center: 475, fwhm: 32}]\n    scale: lots\n", r"sensors\.cam\.scale: expected a number"),
    ],
)
def test_sensor_yaml_is_strict(tmp_path, body, match):
    y = tmp_path / "cams.yaml"
    y.write_text("sensors:\n  cam:\n" + body)
    with pytest.raises(SensorError, match=match) as e:
        load_sensors_yaml(y, replace=True)
    assert str(e.value).startswith(f"{y}: ")  # every error names the file


def test_sensor_yaml_top_level_unknown_key(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text("sensor:\n  cam: {}\n")
    with pytest.raises(SensorError, match=r"s\.yaml: expected a top-level mapping 'sensors"):
        load_sensors_yaml(y)
    y.write_text("sensors:\n  cam:\n    bands: [{name: b, center: 475, fwhm: 32}]\nversion: 2\n")
    with pytest.raises(SensorError, match=r"s\.yaml: unknown key 'version' \(known: sensors\)"):
        load_sensors_yaml(y)


def test_user_sensor_declares_quality_band_and_file_patterns(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text(
        "sensors:\n"
        "  drone_q:\n"
        "    nodata: 0\n"
        "    file_patterns: ['_(?P<band>blue|nir)$']\n"
        "    bands:\n"
        "      - {name: blue, center: 475, fwhm: 32, gsd_m: 0.1}\n"
        "      - {name: nir, center: 842, fwhm: 57, gsd_m: 0.1}\n"
        "    quality_band: {name: CLOUD, gsd_m: 0.1}\n"
        "    invalid_quality: {CLOUD: {values: [2], bits: [7]}}\n"
        "  drone_hsi:\n"
        "    wavelengths: [400, 500, 600]\n"
        "    nodata: -1\n"
    )
    s, h = load_sensors_yaml(y, replace=True)
    assert s.band_from_filename("flight3_nir.tif").name == "nir"
    assert s.band_from_filename("flight3_red.tif") is None
    assert s.quality_rule("flight3_CLOUD.tif") == {"values": [2], "bits": [7]}
    assert s.band("CLOUD").kind == "quality" and s.nodata == 0
    assert h.band_names == ["B001", "B002", "B003"] and h.nodata == -1
    assert get_sensor("drone_q") is s
