"""Reference data files shipped with the engine (see ``inference.datasets``).

A package so that setuptools installs the CSV files as package data.
"""
