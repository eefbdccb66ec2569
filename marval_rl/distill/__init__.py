"""MARVAL distillation: Guided Score Implicit Matching (GSIM) of a MAR teacher's diffusion head."""
