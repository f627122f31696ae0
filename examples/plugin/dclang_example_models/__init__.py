"""Example models for dclang, registered under the `dclang.models` entry-point group."""
