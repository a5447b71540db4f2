"""Test support: fakes (real servers), process and namespace helpers."""
