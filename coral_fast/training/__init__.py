"""CORAL draft training: self-distillation data, multi-step unrolling, CSRA and router losses."""
