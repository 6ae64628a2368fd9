"""Helpers shared by the tests: golden data, micro training configs, subprocess runs, dataset fixtures."""
