"""Reliability suite: crash points, full disks, abusive clients, a model-based test."""
