"""The step engine: the layout schema, the per-device tables over the owners' tensors, the
launch sequence written once, the reference path and the choice of kernel backend."""
