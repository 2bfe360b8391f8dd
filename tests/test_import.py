import jax


def test_eight_fake_devices():
    assert jax.device_count() == 8


def test_package_imports():
    import tim_jax

    assert tim_jax.__version__
