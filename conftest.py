# Root conftest: makes the repository importable first, so tests run against this checkout's eventful_kernels.
