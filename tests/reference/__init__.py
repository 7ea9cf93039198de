"""The float64 NumPy oracle of the model contract (see `numpy_whisper.py`)."""
