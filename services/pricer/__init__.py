"""Turns readings into exact microcredit charges from time-ranged prices (usage.readings.v1 -> usage.charges.v1)."""
