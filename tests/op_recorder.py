"""Every aten op a block of code runs, and the ones that make the host wait for the device:
what test_model.py (BERT's step) and test_objective_electra.py (ELECTRA's) check a step
against."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose result the host must read (a scalar, a data-dependent shape), so they wait for the
# device; "boolean indexing" is indexing by a mask, which runs nonzero() inside the kernel.
SYNCING = frozenset({"_local_scalar_dense", "nonzero", "boolean indexing", "nonzero_static",
                     "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                     "equal", "allclose"})


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops.add(name)
        if name.startswith(("index", "_index_put")) and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ()):
            self.ops.add("boolean indexing")
        return func(*args, **(kwargs or {}))
