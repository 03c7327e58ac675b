"""Reporting: the end-of-run table, sweep tables and the compare command."""
