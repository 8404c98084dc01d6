"""Parallelism primitives: launch environments, process layout, tensor-parallel collectives and layers.

This package knows no model; the model imports it.
"""
