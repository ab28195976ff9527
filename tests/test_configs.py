"""Every config in configs/ and every variant it documents: loads through ml_collections'
config flag (`path:variant`, as `launch.main` loads it) and passes `validate.check_config`.

Configs are found by globbing configs/*.py, so a new config is tested without editing this file.
Nothing here trains; the whole file runs in seconds.
"""

import importlib
import re
from pathlib import Path

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs import base
from smsd_jax import validate
from smsd_jax.errors import SMSDError

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py")
NAMES = [p.stem for p in CONFIG_FILES]
# ml_collections loads a config file with importlib's deprecated load_module().
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def _module(name: str):
    return importlib.import_module(f"configs.{name}")


def _load(spec: str) -> ml_collections.ConfigDict:
    """A config as `launch.main` loads it: `--config=PATH[:VARIANTS]` through config_flags."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values)
    flag_values(["test", f"--config={spec}"])
    return flag_values.config


def _documented(name: str) -> list[str]:
    """The variants the docstring's `Variants` paragraph names, as `:name` in backticks."""
    doc = _module(name).__doc__ or ""
    match = re.search(r"^Variants\b.*?(?=\n\s*\n|\Z)", doc, flags=re.M | re.S)
    assert match, f"configs/{name}.py: its docstring has no 'Variants' paragraph"
    return re.findall(r"`:([A-Za-z0-9_]+)`", match.group(0))


CASES = [(name, variant) for name in NAMES for variant in ("", *_module(name).VARIANTS)]


def test_every_config_is_found():
    # The glob must see the shipped configs (a broken glob would test nothing).
    assert {"base", "quickstart", "study_fashion", "privacy_fashion", "gpu_host", "tpu_pod",
            "cxr_vit_s16"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_variants_include_the_common_ones(name):
    variants = _module(name).VARIANTS
    assert isinstance(variants, tuple) and len(set(variants)) == len(variants)
    assert variants[:len(base.COMMON)] == tuple(base.COMMON) == ("runlocal", "tiny")


@pytest.mark.parametrize("name", NAMES)
def test_docstring_lists_exactly_the_accepted_variants(name):
    documented = _documented(name)
    assert len(set(documented)) == len(documented), f"configs/{name}.py lists one twice"
    assert set(documented) == set(_module(name).VARIANTS)


@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}:{v}" for n, v in CASES])
def test_config_variant_loads_and_validates(name, variant):
    path = ROOT / "configs" / f"{name}.py"
    config = _load(f"{path}:{variant}" if variant else str(path))
    validate.check_config(config)  # 8 simulated devices (tests/conftest.py)
    # The flag passed the variant through: the same config as calling get_config directly.
    assert config.to_dict() == _module(name).get_config(variant or None).to_dict()
    default = _module(name).get_config().to_dict()
    if variant:
        assert config.to_dict() != default, f"{name}:{variant} changes nothing"
    if variant in base.COMMON:
        # runlocal and tiny run on a CPU, on a few thousand images at most.
        assert config.model.attention != "cudnn", "cuDNN attention does not run on a CPU"
        assert 0 < config.data.subset <= 4000
        assert config.server.batch_size <= config.data.subset
    if variant == "tiny":
        assert config.model.size == "tiny"
        assert config.data.subset <= 256


@pytest.mark.parametrize("name", NAMES)
def test_unknown_variant_raises_naming_it(name):
    module = _module(name)
    with pytest.raises(SMSDError) as error:
        module.get_config("tiny,no_such_variant")
    message = str(error.value)
    assert "'no_such_variant'" in message
    assert f"configs/{name}.py" in message
    for known in module.VARIANTS:
        assert known in message


def test_unknown_variant_through_the_config_flag():
    path = ROOT / "configs" / "quickstart.py"
    with pytest.raises(flags.IllegalFlagValueError, match="unknown config variant 'bogus'"):
        _load(f"{path}:runlocal,bogus")


def test_variants_apply_in_order_common_first():
    def own_tiny(c):
        c.server.batch_size *= 2  # after the common tiny's 16
        return c

    def set_lr(lr):
        def fn(c):
            c.server.lr = lr
            return c
        return fn

    own = {"tiny": own_tiny, "a": set_lr(1.0), "b": set_lr(2.0)}
    assert base.variant_names(own) == ("runlocal", "tiny", "a", "b")
    c = base.apply_variants(base.get_config(), "tiny", own)
    assert (c.server.batch_size, c.model.size) == (32, "tiny")
    assert base.apply_variants(base.get_config(), "a,b", own).server.lr == 2.0
    assert base.apply_variants(base.get_config(), "b,a", own).server.lr == 1.0
    # Empty names and spaces around names are ignored; no variant leaves the config alone.
    assert (base.apply_variants(base.get_config(), " a ,, ", own).server.lr == 1.0)
    assert base.apply_variants(base.get_config(), "", own) == base.get_config()
    with pytest.raises(SMSDError, match="'c'.*runlocal, tiny, a, b"):
        base.apply_variants(base.get_config(), "a,c", own)


def test_a_variant_must_return_the_config():
    with pytest.raises(TypeError, match="must return the config"):
        base.apply_variants(base.get_config(), "x", {"x": lambda c: None})
