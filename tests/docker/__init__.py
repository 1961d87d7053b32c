"""The docker test: the image built from this checkout and run (``make test-docker``)."""
