"""fc2.memory: W_o bytes per rank in each mode (DESIGN section 1's figures), and what a model holds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fc2.memory import memory_report, model_memory, model_weight_bytes, oproj_weight_bytes

# DeepSeek-V3: 61 layers, K = 128 heads x 128 = 16384, D = 7168, bf16.
DSV3 = dict(num_layers=61, input_size=16384, output_size=7168, dtype=torch.bfloat16)
LAYER = 16384 * 7168 * 2


def test_deepseek_v3_figures_from_design():
    fc2_full = model_weight_bytes(**DSV3, tp=16, mode="fc2")
    assert fc2_full.bytes_per_rank == 61 * LAYER and round(fc2_full.bytes_per_rank / 1e9, 1) == 14.3
    tp = model_weight_bytes(**DSV3, tp=16, mode="tp")
    assert tp.bytes_per_rank == 61 * LAYER // 16 and round(tp.bytes_per_rank / 1e9, 1) == 0.9
    otp2 = model_weight_bytes(**DSV3, tp=16, mode="fc2", otp=2)
    assert otp2.bytes_per_rank == 61 * LAYER // 2 and otp2.mode == "fc2 o=2"
    # o_shared, o = 1: sharing group = TP group of 16; ceil(61/16) = 4 owned + prefetch 1 + 1 windows.
    shared = model_weight_bytes(**DSV3, tp=16, mode="o_shared", prefetch_step=1)
    assert (shared.layers_stored, shared.bytes_per_rank) == (6, 6 * LAYER)
    # o_shared with o = 2: sharing group = ODP group of 8 ranks holding the same half of W_o.
    shared2 = model_weight_bytes(**DSV3, tp=16, mode="o_shared", otp=2, prefetch_step=2)
    assert (shared2.layers_stored, shared2.layer_bytes) == (8 + 3, LAYER // 2)


def test_report_lists_every_mode():
    rows = memory_report(**DSV3, tp=8, prefetch_step=1, o_shared_otp=(1, 2))
    assert [r.mode for r in rows] == ["tp", "fc2 o=1", "fc2 o=2", "fc2 o=4", "o_shared o=1", "o_shared o=2"]
    assert rows[1].bytes_per_rank == 2 * rows[2].bytes_per_rank == 4 * rows[3].bytes_per_rank
    assert all(r.gib > 0 for r in rows)


def test_module_bytes_and_bad_arguments():
    assert oproj_weight_bytes(64, 32, torch.float32, 4) == 64 * 32 * 4
    assert oproj_weight_bytes(64, 32, 2, 4, otp=2) == 32 * 32 * 2
    assert oproj_weight_bytes(64, 32, 2, 4, mode="tp") == 16 * 32 * 2
    with pytest.raises(ValueError, match="otp=3: expected 1 or a divisor of tp=4"):
        oproj_weight_bytes(64, 32, 2, 4, otp=3)
    with pytest.raises(ValueError, match="mode='rows'"):
        oproj_weight_bytes(64, 32, 2, 4, mode="rows")
    with pytest.raises(ValueError, match="dtype='bf16'"):
        oproj_weight_bytes(64, 32, "bf16", 4)
    with pytest.raises(ValueError, match="sharing group"):
        model_weight_bytes(2, 64, 32, 2, 1, mode="o_shared")
    with pytest.raises(ValueError, match="num_layers=0"):
        model_weight_bytes(0, 64, 32, 2, 2)


def test_model_memory_counts_patched_modules():
    import fc2

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.o_proj = fc2.FlashComm2OProj(32, 24, params_dtype=torch.bfloat16)

    model = nn.ModuleList([Layer() for _ in range(3)])
    assert model_memory(model) == 3 * 32 * 24 * 2 == 3 * model[0].o_proj.weight_bytes()
