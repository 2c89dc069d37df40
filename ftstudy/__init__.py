"""ftstudy: a reproducible comparison of fine-tuning techniques for instruction following on Gemma 3."""
