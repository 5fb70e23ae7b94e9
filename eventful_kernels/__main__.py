"""``python -m eventful_kernels``: print the build and backend report (eventful_kernels.info())."""
import eventful_kernels

eventful_kernels.info()
