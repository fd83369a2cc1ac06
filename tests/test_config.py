import argparse
from dataclasses import replace

import pytest

from wsilocal.config import (
    TrainConfig,
    add_config_arguments,
    config_from_dict,
    load_config,
    overrides_from_args,
    save_config,
)
from wsilocal.errors import ConfigError


def test_yaml_roundtrip_and_command_line_overrides(tmp_path):
    config = TrainConfig(cohort="c.csv", out="run", k=8, boundaries=[2, 4], lr_trunk=3e-5)
    save_config(config, tmp_path / "config.yaml")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--epochs", "3", "--no-rfr", "--lr-aux", "0.001", "--boundaries", "3", "5", "7",
                              "--no-mask-glass"])
    loaded = load_config(tmp_path / "config.yaml", overrides_from_args(args))
    assert loaded.k == 8 and loaded.lr_trunk == 3e-5
    assert loaded.epochs == 3 and loaded.rfr is False and loaded.lr_aux == 0.001
    assert config.mask_glass is True and loaded.mask_glass is False
    assert loaded.boundaries == [3, 5, 7]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"k": "four"}, "k must be int, got str 'four'"),
        ({"epochs": 2.5}, "epochs must be int"),
        ({"rfr": "yes"}, "rfr must be bool"),
        ({"boundaries": 3}, "boundaries must be a list"),
        ({"learning_rate": 0.1}, "unknown key\\(s\\) learning_rate"),
    ],
)
def test_wrong_types_and_unknown_keys(tmp_path, values, message):
    path = tmp_path / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"cohort": "c.csv", "out": "r", **values}))
    with pytest.raises(ConfigError, match=f"^{path}: config: {message}"):
        load_config(path)


@pytest.mark.parametrize(
    ("values", "message"),
    [({"k": 3}, "k must be 1, 2, 4 or 8"), ({"schedule": "fast"}, "schedule must be one of"),
     ({"lr_schedule": "step"}, "lr_schedule must be one of plateau, cosine, got 'step'"),
     ({"best_by": "f1"}, "best_by must be one of balanced_accuracy, loss, auroc, got 'f1'"),
     ({"mpp": -1.0}, "mpp must be positive"), ({"out": ""}, "out: a run directory is required"),
     ({"method": "streaming", "k": 4}, "method streaming is end-to-end training .* needs k 1 .*--streaming"),
     ({"stream_store": "cloud"}, "stream_store must be one of auto, memory, disk"),
     ({"memory_budget_gb": 0.0}, "memory_budget_gb must be positive")],
)
def test_out_of_range_values(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"cohort": "c.csv", "out": "r", **values}).validate()


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cohort: a\nout: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(path)


def test_input_normalisation_is_imagenets_for_weights_files_and_the_slides_own_otherwise():
    from wsilocal.config import IMAGENET_MEAN, IMAGENET_STD
    from wsilocal.train.trainer import input_normalisation

    slides = ([0.8, 0.6, 0.75], [0.1, 0.15, 0.12])
    base = TrainConfig(cohort="c.csv", out="o")
    assert input_normalisation(base, *slides) == slides
    with_weights = replace(base, weights="resnet34.safetensors")
    assert input_normalisation(with_weights, *slides) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert input_normalisation(replace(with_weights, normalisation="dataset"), *slides) == slides
    assert input_normalisation(replace(base, normalisation="imagenet"), *slides)[0] == list(IMAGENET_MEAN)
    with pytest.raises(ConfigError, match="normalisation must be one of auto, imagenet, dataset"):
        replace(base, normalisation="stain").validate()
