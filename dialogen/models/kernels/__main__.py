"""`python -m dialogen.models.kernels`: build the native library once (as `make` does)."""

from .library import main

main()
