"""model.save / keras.models.load_model keep adamkit's optimizer, its state and its trajectory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from _keras_helpers import mlp, regression_data, to_numpy  # noqa: E402

from adamkit.keras import AdamW  # noqa: E402

# Runs in a fresh interpreter: first without adamkit (Keras cannot find the class), then with it.
CHILD = textwrap.dedent(
    """
    import sys
    import keras
    import numpy as np

    path, data, out = sys.argv[1:]
    assert "adamkit" not in sys.modules
    try:
        keras.models.load_model(path)
        print("without adamkit: loaded")
    except TypeError as error:
        print("without adamkit: TypeError", "Could not locate class 'AdamW'" in str(error))
    keras.models.load_model(path, compile=False)  # the weights alone load without adamkit
    import adamkit.keras  # registers the classes: no custom_objects needed

    model = keras.models.load_model(path)
    print("with adamkit:", type(model.optimizer).__module__, type(model.optimizer).__name__)
    arrays = np.load(data)
    model.fit(arrays["x"], arrays["y"], batch_size=16, epochs=1, shuffle=False, verbose=0)
    np.savez(out, *model.get_weights())
    """
)


def _fit(model, x, y):
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)


def test_save_load_restores_optimizer_state_and_training_continues_identically(tmp_path):
    x, y = regression_data(20, 16, "saving")
    model = mlp(0)
    optimizer = AdamW(learning_rate=0.01, weight_decay=0.05, amsgrad=True, clipnorm=1.0)
    model.compile(optimizer=optimizer, loss="mse")
    _fit(model, x[:160], y[:160])
    path = tmp_path / "m.keras"
    model.save(path)

    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer) is AdamW
    assert loaded.optimizer.get_config() == optimizer.get_config()
    assert int(to_numpy(loaded.optimizer.iterations)) == 10
    assert len(loaded.optimizer.variables) == len(optimizer.variables)
    for a, b in zip(loaded.optimizer.variables, optimizer.variables, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=a.path)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        paths = [v.path for v in loaded.optimizer.variables if v.path.endswith(f"kernel_{key}")]
        assert len(paths) == 3, (key, paths)

    _fit(model, x[160:], y[160:])
    _fit(loaded, x[160:], y[160:])
    expected = model.get_weights()
    for a, b in zip(loaded.get_weights(), expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(expected[0], keras.models.load_model(path).get_weights()[0])

    # A fresh interpreter that imports adamkit.keras but passes no custom_objects.
    data, out = tmp_path / "data.npz", tmp_path / "out.npz"
    np.savez(data, x=x[160:], y=y[160:])
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(data), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "without adamkit: TypeError True" in result.stdout
    assert "with adamkit: adamkit.keras.optimizers AdamW" in result.stdout
    with np.load(out) as arrays:
        for i, b in enumerate(expected):
            np.testing.assert_array_equal(arrays[f"arr_{i}"], b)
