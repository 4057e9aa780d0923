"""Test-only fault injection for the engine tests' negative control (never on a user's path).

The engine tests put this directory on PYTHONPATH of one engine run only; Python imports
``sitecustomize`` at start-up in every process of that run (front end, engine core, workers).
With ``FC2_TEST_WO_ERROR=e`` every W_o that reaches a FlashComm2 module through its
``weight_loader`` is scaled by ``1 + e``: a FlashComm2 module with a wrong weight, which the
logprob oracle must catch (greedy tokens of a tiny model survive it).
"""

import os

_ERROR = os.environ.get("FC2_TEST_WO_ERROR")
if _ERROR:
    from fc2.oproj import FlashComm2OProj

    _scale = 1.0 + float(_ERROR)
    _original = FlashComm2OProj.weight_loader

    def _weight_loader(self, param, loaded_weight):
        if param is self.weight:
            loaded_weight = loaded_weight * _scale
        return _original(self, param, loaded_weight)

    FlashComm2OProj.weight_loader = _weight_loader
