"""`python -m istio_init` runs the same CLI as the `istio-init` console script."""

from istio_init.entry import console

console()
