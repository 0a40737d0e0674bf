"""Test-only: lets accelerate run FSDP in a CPU (gloo) process group, which torch supports and accelerate 1.15
does not turn on (it keeps MULTI_CPU). Processes started with this directory on PYTHONPATH import it first. The
kind of run is changed as accelerate's FSDP branch would change it (its mixed-precision policy included), so the
sharding, the checkpoints and the gathered state dicts are accelerate's own."""

import os

if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
    from accelerate import state
    from accelerate.utils import DistributedType

    _init = state.AcceleratorState.__init__

    def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if fsdp_plugin is not None:  # what accelerate's FSDP branch does with it
                if self._mixed_precision != "no":
                    fsdp_plugin.set_mixed_precision(self._mixed_precision)
                self.fsdp_plugin = fsdp_plugin

    state.AcceleratorState.__init__ = _fsdp_on_cpu
