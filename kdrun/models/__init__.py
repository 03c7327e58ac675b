"""kdrun model zoo: CIFAR networks of the CRD benchmark and any timm model, all as
:class:`TapModel` (logits plus named intermediate feature taps).

Importing this package also registers every zoo network in timm as ``cifar_<name>``.
"""

from kdrun.models.base import TapModel, tap_shapes
from kdrun.models.factory import ZOO, count_macs, count_params, create_model

__all__ = ["TapModel", "create_model", "ZOO", "count_params", "count_macs", "tap_shapes"]
