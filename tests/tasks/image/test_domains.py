"""``[data] source = "fashion-mnist-domains"``: visible domains by image index, on tiny fake idx files."""

import numpy as np
import pytest

import moqe_compile
from moqe_compile.tasks.image.config import BuildConfig, DataConfig, ExpertRecipe, load_recipe
from moqe_compile.tasks.image import fashion_mnist as fm
from moqe_compile.tasks.image.data import SPLITS, build_splits, calibration_inputs, num_sources
from moqe_compile.errors import ConfigError

from ...models import FMNIST_TEST as N_TEST
from .helpers import MEAN, STD, gray_pre

DOMAINS = ["original", "inverted", "noise"]


def domains_data(**kw) -> DataConfig:
    return DataConfig(source=fm.DOMAINS_SOURCE, augmentations=0, targets="labels",
                      domains=kw.pop("domains", DOMAINS), **kw)


def index_of(source: str) -> int:
    return int(source[source.index("[") + 1 : -1])


def test_every_transform_keeps_shape_dtype_and_is_visible(fake_fmnist):
    x, _ = fake_fmnist["train"]
    idx = np.arange(len(x))
    for d in fm.DOMAINS:
        out, names = fm.apply_domains(x, idx, [d], "train")
        assert out.dtype == np.uint8 and out.shape == x.shape and set(names) == {d}
        if d == "original":
            assert np.array_equal(out, x)
        else:
            assert np.abs(out.astype(int) - x).mean() > 5, d  # visibly different
    assert np.array_equal(fm.apply_domains(x, idx, ["inverted"], "train")[0], 255 - x)
    assert np.array_equal(fm.apply_domains(x, idx, ["rot90"], "train")[0], np.rot90(x, 1, axes=(1, 2)))
    with pytest.raises(ConfigError, match="'sepia' is not one of"):
        fm.apply_domains(x, idx, ["sepia"], "train")


def test_domain_is_fixed_by_the_image_index_whatever_loads_it(fake_fmnist):
    x, _ = fake_fmnist["train"]
    idx = np.arange(len(x))
    full, names = fm.apply_domains(x, idx, DOMAINS, "train")
    assert list(names[:6]) == DOMAINS * 2  # domains[index % len(domains)]
    sub = np.array([17, 5, 101, 2, 44])  # any subset, any order: the same image, the same noise
    part, part_names = fm.apply_domains(x[sub], sub, DOMAINS, "train")
    assert np.array_equal(part, full[sub]) and np.array_equal(part_names, names[sub])
    again, _ = fm.apply_domains(x, idx, DOMAINS, "train")
    assert np.array_equal(again, full)
    # The noise depends on the file: image i of the test file gets other noise than train image i.
    noisy = np.flatnonzero(names == "noise")[:3]
    test_version, _ = fm.apply_domains(x[noisy], noisy, DOMAINS, "test")
    assert not np.array_equal(test_version, full[noisy])


def test_splits_are_disjoint_and_shown_in_their_domain(fake_fmnist):
    cfg = domains_data(max_samples=120, seed=3)
    s = build_splits(cfg, gray_pre())
    assert list(s) == list(SPLITS) and num_sources(cfg) == 120 + N_TEST
    train_sets = [set(s[k].sources) for k in SPLITS[:3]]
    assert sum(map(len, train_sets)) == 120 and len(set.union(*train_sets)) == 120  # disjoint
    for k, file in zip(SPLITS, ["train"] * 3 + ["test"]):
        d = s[k]
        idx = np.array([index_of(n) for n in d.sources])
        raw, labels = fake_fmnist[file]
        assert d.domains is not None and np.array_equal(d.domains, np.asarray(DOMAINS)[idx % 3])
        shown, _ = fm.apply_domains(raw[idx], idx, DOMAINS, file)
        assert np.array_equal(d.x, fm.normalize(shown, MEAN, STD)) and np.array_equal(d.labels, labels[idx])
    assert len(s["test"].x) == N_TEST and set(s["test"].domains) == set(DOMAINS)
    # Without domains: the same images, untouched, and no domain names.
    plain = build_splits(DataConfig(source="fashion-mnist", augmentations=0, targets="labels", max_samples=120,
                                    seed=3), gray_pre())
    assert plain["router_val"].sources == s["router_val"].sources and plain["router_val"].domains is None
    orig = s["router_val"].domains == "original"
    assert np.array_equal(plain["router_val"].x[orig], s["router_val"].x[orig])
    assert not np.array_equal(plain["router_val"].x[~orig], s["router_val"].x[~orig])


def test_calibration_inputs_restrict_to_one_domain(fake_fmnist):
    s = build_splits(domains_data(max_samples=120), gray_pre())
    cal = s["calibration"]
    assert calibration_inputs(cal) is cal.x and calibration_inputs(cal, "") is cal.x
    for d in DOMAINS:
        sub = calibration_inputs(cal, d)
        assert len(sub) == int((cal.domains == d).sum()) > 0
        assert np.array_equal(sub, cal.x[cal.domains == d])
    with pytest.raises(ConfigError, match="holds no sample of that domain"):
        calibration_inputs(cal, "blur")
    plain = build_splits(DataConfig(source="fashion-mnist", augmentations=0, targets="labels", max_samples=120),
                         gray_pre())
    with pytest.raises(ConfigError, match="needs \\[data\\] source = 'fashion-mnist-domains'"):
        calibration_inputs(plain["calibration"], "inverted")


@pytest.mark.parametrize("kw,match", [
    ({"domains": []}, "needs domains"),
    ({"domains": ["original", "sepia"]}, "'sepia' is not one of"),
    ({"domains": ["noise", "noise"]}, "repeats a domain"),
])
def test_bad_domain_settings_are_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        domains_data(**kw)


def test_domains_need_the_domains_source():
    with pytest.raises(ConfigError, match="is for source = 'fashion-mnist-domains'"):
        DataConfig(source="fashion-mnist", augmentations=0, domains=["inverted"])


def _experts(dom: str) -> list:
    return [ExpertRecipe(name="a"), ExpertRecipe(name="b", calibration_domain=dom)]


def test_calibration_domain_must_be_a_data_domain():
    experts = _experts
    BuildConfig(data=domains_data(), experts=experts("noise"))
    with pytest.raises(ConfigError, match=r"calibration_domain = 'blur' is not one of \[data\] domains"):
        BuildConfig(data=domains_data(), experts=experts("blur"))
    with pytest.raises(ConfigError, match="domains need source = 'fashion-mnist-domains'"):
        BuildConfig(experts=experts("noise"))


def test_manifest_round_trip_keeps_domains_and_calibration_domain():
    cfg = BuildConfig(data=domains_data(max_samples=50),
                      experts=[ExpertRecipe.from_preset("mix", "w4a8-strongest", weight_bits=3),
                               ExpertRecipe.from_preset("inv", "w4a8-strongest", weight_bits=3,
                                                        calibration_domain="inverted")])
    blob = cfg.to_manifest()
    assert blob["_data"]["data"]["domains"] == DOMAINS
    assert blob["_data"]["experts"][1]["calibration_domain"] == "inverted"
    back = BuildConfig.from_manifest(blob)
    assert back.to_dict() == cfg.to_dict()
    assert back.data.source == fm.DOMAINS_SOURCE and back.experts[1].calibration_domain == "inverted"
    # Manifests written before the option have neither key: the whole calibration split, no domains.
    old = cfg.to_manifest()
    del old["_data"]["experts"][1]["calibration_domain"]
    old["_data"]["data"] = {"source": "fashion-mnist", "augmentations": 0}
    assert BuildConfig.from_manifest(old).experts[1].calibration_domain == ""


@pytest.mark.parametrize("recipe,bits", [("fmnist-domains.toml", 3), ("fmnist-domains-w2a8.toml", 2)])
def test_shipped_domains_recipes_are_valid(recipe, bits):
    from pathlib import Path

    cfg = load_recipe(Path(moqe_compile.__file__).parent / "recipes" / recipe)
    assert cfg.data.source == fm.DOMAINS_SOURCE and len(cfg.data.domains) >= 3
    per_domain = {e.calibration_domain for e in cfg.experts if e.calibration_domain}
    assert per_domain == set(cfg.data.domains)
    assert all(e.weight_bits == bits for e in cfg.experts)
    # The copies control repeats the first strongest expert: the one calibrated on the mixture.
    from moqe_compile.tasks.image.experts import copy_recipe

    assert copy_recipe(cfg).calibration_domain == ""
