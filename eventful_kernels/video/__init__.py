"""Video demo / benchmark support: decoding (PyAV), dense vs eventful runs, plots."""
