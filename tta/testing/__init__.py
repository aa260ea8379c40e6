"""Built-in small models and data for tests, benchmarks, `tta eval` and offline demos.

Nothing here is downloaded: the data ship with scikit-learn and scikit-image, and the models
are trained here in seconds and cached on disk.
"""
