"""Operator tools: index backfill and store verification."""
