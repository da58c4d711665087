"""Pieces the tests run inside the jupyverse process they start."""
