"""The ``adamkit`` command-line app: ``adamkit train`` and ``adamkit bench``.

Needs the ``app`` extra (``pip install adamkit[app]``: torch, scikit-learn, matplotlib, tqdm).
Modules, each small and importable on its own:

- ``cli``: argument parsing only; turns ``argv`` into a :class:`~adamkit.app.config.TrainConfig`.
- ``config``: the settings of a run, their defaults per data set, and their validation.
- ``data`` / ``download``: the bundled digits, MNIST-format IDX files, Keras ``.npz`` files, and
  the checksummed MNIST download.
- ``model`` / ``optimizers``: the MLP and the optimizer table (name -> factory).
- ``loop``: the training loop, which only emits events.
- ``report`` / ``plots`` / ``checkpoint``: subscribers to those events (progress, CSV,
  ``config.json``, ``curves.png``, ``checkpoint.pt``).
- ``train``: wires one run (or a ``--compare`` set of runs) together.
- ``errors`` / ``files``: the one-line errors behind exit status 2, and atomic file writes.
"""
