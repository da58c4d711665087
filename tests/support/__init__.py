"""Pieces shared by the tests (processes.py), and pieces the tests run inside the jupyverse
process they start."""
