"""``python -m autotune``: Optuna search of FlashComm2's kernel configs per model and cluster.

- `models`: o_proj shapes (presets, Hugging Face config.json);
- `space`: what is searched, assembled from the kernels' own definitions;
- `search`: rank 0's study driver (screening, repeats answered from the study, sweeps);
- `measure`: rank-consistent measurement (every rank runs the same config, the slowest counts);
- `targets`: how each kernel runs on the ranks; `runner`: one run on every rank;
- `storage`: Optuna RDB storage (SQLite / PostgreSQL), study names, heartbeats;
- `export`: tables for fc2 (`fc2.tuned_tables`); `report`: tables and plots; `cli`, `launch`.
"""
