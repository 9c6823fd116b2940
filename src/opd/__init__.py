"""On-policy distillation study pipeline (release rule, TA-OPD)."""
