"""The front end's name lists agree with the packages that build the things they name."""

from dclang import registry
from dclang.data import DATASETS
from dclang.models import BUILDERS, build_model


def test_every_registered_model_name_builds_and_every_builder_is_registered():
    assert set(registry.MODELS) == set(BUILDERS)
    for name in registry.MODELS:
        assert registry.is_model(name)


def test_generic_wide_resnet_names_follow_the_depth_rule():
    assert registry.is_model("wrn22_3")
    build_model("wrn22_3", 10, 3, 8)
    assert not registry.is_model("wrn21_3")  # (21 - 4) is not divisible by 6
    assert not registry.is_model("wrn28_0")


def test_registry_lists_the_data_catalog():
    assert registry.dataset_names() == sorted(DATASETS)
