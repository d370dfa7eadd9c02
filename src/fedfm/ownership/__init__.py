"""Models their owners keep, and knowledge that moves between models (docs/ownership.md).

One module per algorithm: ``offsite`` (Offsite-Tuning, Xiao et al. 2023), ``blackbox`` (BBT, Sun et al. 2022;
FedBPT, Sun et al. 2023), ``transfer`` (FedMD, Li & Wang 2019; FedDF, Lin et al. 2020). Synthetic data from the
foundation model is a data source's concern and lives in ``data/synthetic.py``.
"""
