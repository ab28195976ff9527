"""Keys no one can guess: 128 bits from the OS by default, every bit used; public demo keys
only when asked for, and then said at every stage."""

import importlib
import stat
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import base, quickstart
from smsd_jax import consortium, data, keys, payload, site
from smsd_jax.layout import Layout

ROOT = Path(__file__).resolve().parents[1]


def _head_kernel(config, path, seed):
    consortium.init_head(config, path, secret_seed=seed)
    return np.asarray(consortium.load_head(path)[1]["patch_embed"]["kernel"])


def test_every_bit_of_a_key_changes_the_head(tmp_path):
    # A key's high bits count as much as its low ones: a 64-bit key (threefry) would drop them.
    config = base.get_config("tiny")
    secret = keys.draw()
    assert secret.bit_length() <= keys.BITS
    w = _head_kernel(config, tmp_path / "a", secret)
    for bit in (0, 63, 64, 127):
        other = _head_kernel(config, tmp_path / f"b{bit}", secret ^ (1 << bit))
        assert not np.allclose(w, other), f"bit {bit} of the key does not change the head"
    np.testing.assert_array_equal(w, _head_kernel(config, tmp_path / "again", secret))


def test_every_bit_of_a_site_key_changes_the_permutations():
    secret = keys.draw()
    data_of = lambda s: np.asarray(jax.random.key_data(site.image_keys(s, 0, 4)))
    reference = data_of(secret)
    for bit in (0, 64, 127):
        assert not np.array_equal(reference, data_of(secret ^ (1 << bit)))


def test_a_key_out_of_range_is_refused():
    with pytest.raises(ValueError, match="outside"):
        keys.prng_key(2**128)
    assert keys.from_text(keys.to_text(2**128 - 1)) == 2**128 - 1


def test_shipped_configs_fix_no_key_unless_they_are_studies():
    # A user who copies a config for real data must not inherit a public key. The studies on
    # public data fix theirs through base.demo_keys, which says so at every stage.
    studies = {"study_fashion", "curve_fashion", "frontier_fashion", "per_site_heads",
               "segment_mri", "recipe_fashion"}
    for path in sorted((ROOT / "configs").glob("*.py")):
        if path.stem in ("__init__", *studies) or path.stem.startswith("privacy"):
            continue
        config = importlib.import_module(f"configs.{path.stem}").get_config()
        assert not keys.is_demo(config), f"configs/{path.name} fixes a public key"
    assert keys.is_demo(quickstart.get_config("demo_keys"))


def test_site_key_is_drawn_once_kept_private_and_reused(tmp_path):
    layout = Layout(tmp_path)
    first = consortium.site_secret(layout, 0)
    assert first == consortium.site_secret(layout, 0) != consortium.site_secret(layout, 1)
    assert stat.S_IMODE(layout.secret(0).stat().st_mode) == 0o600
    assert len(layout.secret(0).read_text().split('"key": "')[1].split('"')[0]) == 32


@pytest.mark.slow
def test_demo_keys_are_written_into_the_metadata_and_said(tmp_path, capsys):
    config = quickstart.get_config("tiny,demo_keys")
    config.workdir = str(tmp_path)
    layout = Layout(tmp_path)
    consortium.set_up(config, layout)
    manifest = site.site_stage(config, layout, 0)
    assert manifest["keys"] == keys.DEMO
    assert "WARNING" in capsys.readouterr().out
    # Drawn from the OS: the head's and the payload's metadata say the keys are secret.
    config = quickstart.get_config("tiny")
    secret = Layout(tmp_path / "secret")
    consortium.set_up(config, secret)
    manifest = site.site_stage(config, secret, 0)
    assert manifest["keys"] == keys.SECRET
    assert "WARNING" not in capsys.readouterr().out
    assert payload.read_manifest(secret.payload(0))["keys"] == keys.SECRET


def test_a_secret_site_key_with_a_public_head_is_labelled_public(tmp_path):
    config = base.get_config("tiny")
    consortium.init_head(config, tmp_path / "head", secret_seed=1)  # anyone can redraw it
    manifest = site.run_site(config, 0, data.fashion_mnist("train"), np.arange(64),
                             tmp_path / "head", tmp_path / "payload", public_key=False)
    assert manifest["keys"] == keys.DEMO
