"""tpmpi/studies/cluster.py: the presets load with a source for every number, are shipped as
package data, and the device's time for a product follows the documented curve (hand
computations of tile and wave quantization and of the memory roofline)."""
import configparser
import json
import math

import pytest

from conftest import ROOT
from tpmpi.studies.cluster import REQUIRED, cluster_from_dict, load_cluster, preset_names

PRESETS = ROOT / "tpmpi" / "studies" / "presets"


def test_the_issue_s_presets_are_shipped():
    assert {"dgx-2h", "dgx-a100", "dgx-a100-40gb", "dgx-h100"} <= set(preset_names())


@pytest.mark.parametrize("name", ["dgx-2h", "dgx-a100", "dgx-a100-40gb", "dgx-h100"])
def test_every_number_of_a_preset_has_a_source(name):
    data = json.loads((PRESETS / f"{name}.json").read_text())
    cluster = load_cluster(name)
    assert set(REQUIRED) <= set(cluster.sources)
    assert all(len(text) > 20 for text in data["sources"].values())
    assert cluster.device.memory_bytes > 16 * 2**30 and cluster.nic_bw > 10e9


def test_package_data_lists_the_preset_and_published_files():
    """setup.cfg's package_data globs cover every JSON file the planner reads (a wheel without
    them would fail at load_cluster)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    globs = [g.strip() for g in cfg["options.package_data"]["tpmpi.studies"].split(",")]
    studies = ROOT / "tpmpi" / "studies"
    shipped = {p for g in globs for p in studies.glob(g)}
    assert shipped == set(studies.glob("presets/*.json")) | set(studies.glob("published/*.json"))


def test_a_large_product_is_its_quantized_flops_at_the_measured_efficiency():
    """A100, 8192^3 in float16: 32 x 64 = 2048 tiles of 256 x 128 run in ceil(2048 / 108) = 19
    waves of 108 SMs, at 86.9 % of 312 TFLOP/s."""
    dev = load_cluster("dgx-a100").device
    flops = 2.0 * 19 * 108 * 256 * 128 * 8192
    assert dev.product_s(8192, 8192, 8192, 1, "float16", 2) == pytest.approx(
        flops / (312e12 * 0.869))


def test_wave_quantization_one_row_more_takes_a_second_wave():
    """3072 x 1152 is 12 x 9 = 108 tiles of 256 x 128, one wave on 108 SMs; one more row
    makes 117 tiles, two waves: twice the time."""
    dev = load_cluster("dgx-a100").device
    one = dev.product_s(3072, 8192, 1152, 1, "float16", 2)
    assert one == pytest.approx(2.0 * 108 * 256 * 128 * 8192 / (312e12 * 0.869))
    assert dev.product_s(3073, 8192, 1152, 1, "float16", 2) == pytest.approx(2 * one)


def test_a_thin_product_is_memory_bound():
    """16 tokens through an 8192 x 8192 weight: 32 tiles of 128 x 256 with K split in 3 over
    the idle SMs take less than the weight's bytes at 88 % of HBM."""
    dev = load_cluster("dgx-a100").device
    nbytes = (16 * 8192 + 8192 * 8192 + 16 * 8192) * 2
    assert dev.product_s(16, 8192, 8192, 1, "bfloat16", 2) == pytest.approx(
        nbytes / (2039e9 * 0.88))
    assert dev.product_s(0, 8192, 8192, 1, "bfloat16", 2) == 0.0


def test_element_wise_work_streams_at_the_measured_fraction_of_hbm():
    dev = load_cluster("dgx-h100").device
    assert dev.pointwise_s(3.35e12) == pytest.approx(1 / 0.88)
    assert dev.pointwise_s(8, flops=67e12) == pytest.approx(1.0)  # compute-bound at fp32 peak


def test_a_dtype_the_device_lacks_is_named():
    with pytest.raises(ValueError, match=r"dtype='bfloat16': the V100-SXM3-32GB has no "
                                         r"bfloat16 rate \(it has float16, float32, float64\)"):
        load_cluster("dgx-2h").device.product_s(64, 64, 64, 1, "bfloat16", 2)


def test_a_user_file_loads_and_errors_name_file_field_and_value(tmp_path):
    data = json.loads((PRESETS / "dgx-a100.json").read_text())
    data["name"] = "mine"
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    assert load_cluster(str(path)).name == "mine"
    with pytest.raises(ValueError, match=r"cluster='nope': expected one of .*dgx-a100"):
        load_cluster("nope")
    broken = json.loads(json.dumps(data))
    del broken["sources"]["network.nic_gbps"]
    with pytest.raises(ValueError, match=r"cluster preset x: no source for network.nic_gbps"):
        cluster_from_dict(broken, "x")
    broken = json.loads(json.dumps(data))
    broken["device"]["gemm_efficiency"]["float16"] = 1.5
    with pytest.raises(ValueError, match=r"gemm_efficiency=\{'float16': 1.5\}: expected values "
                                         r"<= 1.0"):
        cluster_from_dict(broken, "x")
    broken = json.loads(json.dumps(data))
    broken["network"]["nic_gbps"] = -1
    with pytest.raises(ValueError, match=r"network.nic_gbps=-1: expected a number > 0"):
        cluster_from_dict(broken, "x")
    broken = json.loads(json.dumps(data))
    del broken["nvlink"]
    with pytest.raises(ValueError, match=r"missing nvlink.ring_busbw_gbps"):
        cluster_from_dict(broken, "x")
    broken = json.loads(json.dumps(data))
    broken["device"]["arch"] = "kepler"
    with pytest.raises(ValueError, match=r"device.arch='kepler': expected one of volta"):
        cluster_from_dict(broken, "x")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"cluster preset .*bad.json"):
        load_cluster(str(bad))


def test_quantization_never_beats_the_unpadded_flops():
    dev = load_cluster("dgx-h100").device
    for m, k, n in [(1000, 512, 3000), (17, 17, 17), (4096, 128, 4096)]:
        ideal = 2.0 * m * k * n / (989e12 * 0.803)
        assert dev.product_s(m, k, n, 3, "bfloat16", 2) >= 3 * ideal * (1 - 1e-12)
        assert math.isfinite(dev.product_s(m, k, n, 3, "bfloat16", 2))


@pytest.mark.parametrize("name", ["dgx-2h", "dgx-a100", "dgx-a100-40gb", "dgx-h100"])
def test_docs_planning_lists_every_number_with_its_source(name):
    """docs/planning.md shows each preset's fields, values and sources as the file has them."""
    page = (ROOT / "docs" / "planning.md").read_text()
    section = page.split(f"### `{name}`", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    data = json.loads((PRESETS / f"{name}.json").read_text())
    for field, source in data["sources"].items():
        value = data
        for part in field.split("."):
            value = value[part]
        if isinstance(value, dict):
            shown = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, list):
            shown = "x".join(map(str, value))
        else:
            shown = str(value)
        assert f"| `{field}` | {shown} | {source} |" in section, field
