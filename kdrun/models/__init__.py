"""kdrun model zoo: CIFAR networks of the CRD benchmark and any timm model, all as
:class:`TapModel` (logits plus named intermediate feature taps).

Importing this package also registers every zoo network in timm as ``cifar_<name>``.
Model configs (``conf/model/<name>.yaml``) name :func:`zoo_model` or :func:`timm_model` as
their ``_target_``; :func:`create_model` is the shorthand for Python callers.
"""

from kdrun.models.base import TapModel, tap_shapes
from kdrun.models.factory import ZOO, count_macs, count_params, create_model, latency_ms, timm_model, zoo_model

__all__ = ["ZOO", "TapModel", "count_macs", "count_params", "create_model", "latency_ms", "tap_shapes", "timm_model", "zoo_model"]
