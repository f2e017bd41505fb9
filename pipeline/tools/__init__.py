"""Tools beside the two stages: predict, report, info, and the demo dataset."""
