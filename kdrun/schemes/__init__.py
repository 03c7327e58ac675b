"""Schemes: who teaches whom. Each is a config in conf/scheme/ with a `_target_` here."""
