"""``python -m distsgd.train``: data-parallel MLP training on bundled data, under mpirun."""
