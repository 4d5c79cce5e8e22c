"""Experiments that train several runs and compare them (`learning`: does semi-supervision help?)."""
