import pytest

from raymia.config import ConfigError, alpha_grid, available_presets, load_config


def test_presets_load_and_extend():
    assert {"orl", "smoke", "mnist"} <= set(available_presets())
    smoke = load_config("smoke")
    assert smoke.data.name == "orl" and smoke.data.private_ids == 5   # from smoke
    assert smoke.target.loss == "cosface"                             # inherited from orl
    assert load_config("mnist").target.arch == "lenet5"


def test_overrides_are_typed():
    cfg = load_config("orl", ["target.epochs=3", "dummy.sigma_tilde2=0.01", "sweep.alphas=[1, 0.5]",
                              "data.root=/x"])
    assert cfg.target.epochs == 3 and isinstance(cfg.target.epochs, int)
    assert cfg.dummy.sigma_tilde2 == 0.01
    assert alpha_grid(cfg.sweep) == [1.0, 0.5]
    assert cfg.data.root == "/x"


@pytest.mark.parametrize("override, needle", [
    ("target.epoch=3", "unknown config key 'target.epoch'"),
    ("nosuch.key=1", "unknown config key 'nosuch'"),
    ("target.epochs=abc", "expects an integer"),
    ("target.epochs=2.5", "expects an integer"),
    ("data.aux_lfw=3", "true/false"),
    ("sweep.alphas=[1.5]", "outside [0, 1]"),
    ("sweep.alpha_step=0", "alpha_step must be > 0"),
    ("dummy.variant=magic", "dummy.variant must be one of paper, calibrated; got 'magic'"),
    ("sweep.variants=[paper,magic]", "sweep.variants[1] must be one of paper, calibrated"),
    ("target.arch=vgg", "target.arch must be one of faceresnet, smallcnn, lenet5"),
    ("data.aux_name=web", "data.aux_name must be one of '', celeba, imagefolder"),
    ("justtext", "section.key=value"),
])
def test_bad_config_is_a_clear_error(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config("orl", [override])
    assert needle in str(e.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")


def test_alpha_grid_default_step():
    cfg = load_config("orl")
    g = alpha_grid(cfg.sweep)
    assert g[0] == 1.0 and g[-1] == 0.0 and len(g) == 6             # orl: step 0.2 (2-core budget)
    assert len(alpha_grid(load_config("orl_large").sweep)) == 11    # orl_large: step 0.1


@pytest.mark.parametrize("step, expected", [
    (0.15, [1.0, 0.9, 0.75, 0.6, 0.45, 0.3, 0.15, 0.0]),      # does not divide [0, 1]: stop added, nothing above it
    (0.35, [1.0, 0.7, 0.35, 0.0]),
    (0.25, [1.0, 0.75, 0.5, 0.25, 0.0]),
])
def test_alpha_grid_steps_that_do_not_divide_the_range(step, expected):
    cfg = load_config("orl", [f"sweep.alpha_step={step}"])
    assert alpha_grid(cfg.sweep) == expected
